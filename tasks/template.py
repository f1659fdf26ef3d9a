"""template stage: render each conversation with the tokenizer's chat template, and record which
character spans are trainable (the assistant turns with their end-of-turn token).

    python -m tasks.template    (or: dvc repro template)

Also records, for evaluation, the prompt that precedes the last assistant turn (ending with the
template's generation prompt) and that turn's text as the reference answer.
"""
from __future__ import annotations

import json
import logging

import pandas as pd

from loraflow import layout
from loraflow.artifacts import write_parquet
from loraflow.masking import hf_render, trainable_spans
from loraflow.modeling import load_tokenizer, resolve_base
from loraflow.params import TemplateParams
from loraflow.stage import main

log = logging.getLogger("loraflow.template")


def template_rows(df: pd.DataFrame, render, train_on: str) -> pd.DataFrame:
    out = []
    for row in df.itertuples(index=False):
        messages = json.loads(row.messages)
        text, spans = trainable_spans(render, messages, train_on, int(getattr(row, "trainable_from", 0)))
        # validation guarantees the last turn is the assistant's: its span starts where its prompt ends
        prompt = text[:spans[-1][0]] if spans and spans[-1][1] == len(text) else render(messages[:-1], True)
        out.append({"id": row.id, "family": row.family, "source": row.source, "line": row.line,
                    "text": text, "spans": json.dumps(spans), "n_turns": len(messages),
                    "prompt": prompt, "reference": messages[-1]["content"]})
    return pd.DataFrame(out)


def run(params: TemplateParams) -> dict:
    tokenizer = load_tokenizer(resolve_base(layout.BASE_DIR))
    df = pd.read_parquet(layout.VALIDATED)
    out = template_rows(df, hf_render(tokenizer), params.train_on)
    write_parquet(layout.TEMPLATED, out)
    return {"rows": len(out), "multi_turn_rows": int((out["n_turns"] > 2).sum()),
            "trainable_spans": int(out["spans"].map(lambda s: len(json.loads(s))).sum())}


if __name__ == "__main__":
    main("template", run)
