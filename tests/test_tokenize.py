"""tokenize: overflow handling is counted, the split is deterministic and order independent."""
import json

import pandas as pd

from conftest import templated
from loraflow.masking import IGNORE_INDEX
from loraflow.params import TokenizeParams
from tasks.tokenize import in_eval_split, tokenize_rows


def rows(n_long_turns=1):
    convo = [{"role": "user", "content": "Tell me about Peru. " * 30}, {"role": "assistant", "content": "Lima " * n_long_turns}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    return pd.DataFrame([{"id": "long", "messages": json.dumps(convo), "family": "", "source": "s", "line": 1},
                         {"id": "short", "messages": json.dumps(short), "family": "", "source": "s", "line": 2}])


def test_overflow_drop_and_truncate_are_counted(tiny_tokenizer):
    rendered = templated(rows(), tiny_tokenizer)
    kept, rejects = tokenize_rows(rendered, tiny_tokenizer, TokenizeParams(max_length=40, overflow="drop"))
    assert list(kept["id"]) == ["short"] and rejects[0]["id"] == "long" and "max_length=40" in rejects[0]["reasons"][0]
    # truncating cuts the answer off: the row has no trained token left and is rejected, with that reason
    kept, rejects = tokenize_rows(rendered, tiny_tokenizer, TokenizeParams(max_length=40, overflow="truncate"))
    assert rejects[0]["reasons"] == ["no trained tokens left after truncation"]


def test_truncate_keeps_rows_with_trained_tokens(tiny_tokenizer):
    rendered = templated(rows(n_long_turns=60), tiny_tokenizer)
    width = len(tiny_tokenizer(rendered["text"][0])["input_ids"]) - 5
    kept, rejects = tokenize_rows(rendered, tiny_tokenizer, TokenizeParams(max_length=width, overflow="truncate"))
    long = kept[kept["id"] == "long"].iloc[0]
    assert long["truncated"] and long["length"] == width and any(l != IGNORE_INDEX for l in long["labels"])


def test_split_is_deterministic_and_near_fraction():
    ids = [f"row{i}" for i in range(5000)]
    first = [in_eval_split(i, "s", 0.1) for i in ids]
    assert first == [in_eval_split(i, "s", 0.1) for i in ids]
    assert 0.08 < sum(first) / len(ids) < 0.12
    assert first != [in_eval_split(i, "other", 0.1) for i in ids]
