"""The masking primitive on toy conversations, and agreement with TRL's completion-only masking."""
import json

import pytest

import datetime as dt

from conftest import templated
from loraflow.chat_format import renderer
from loraflow.masking import (IGNORE_INDEX, RowError, end_of_turn_text, labels_from_spans, render_spans,
                              user_turn_end)
from loraflow.params import TokenizeParams
from tasks.tokenize import tokenize_rows

SINGLE = [{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima"}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Which day comes after Monday?"}, {"role": "assistant", "content": "Tuesday"},
         {"role": "user", "content": "And after that?"}, {"role": "assistant", "content": "Wednesday"}]


def tokens_and_labels(tok, messages, train_on="all_assistant"):
    render = renderer(tok, tok.chat_template, dt.date(2026, 1, 1))
    done = render_spans(render, messages, end_of_turn_text(render), train_on, user_end=user_turn_end(render))
    enc = tok(done.text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], labels_from_spans(enc["input_ids"], enc["offset_mapping"], done.spans)


def trained_segments(tok, ids, labels):
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i, "a trained label must be the token itself"
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)); cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_single_turn_trains_exactly_the_answer_and_its_end_token(tiny_tokenizer):
    ids, labels = tokens_and_labels(tiny_tokenizer, SINGLE)
    assert trained_segments(tiny_tokenizer, ids, labels) == ["Lima<|end|>"]
    # the last token is the end-of-turn token, and it is trained
    assert ids[-1] == tiny_tokenizer.eos_token_id and labels[-1] == tiny_tokenizer.eos_token_id


def test_multi_turn_trains_every_assistant_turn(tiny_tokenizer):
    ids, labels = tokens_and_labels(tiny_tokenizer, MULTI)
    assert trained_segments(tiny_tokenizer, ids, labels) == ["Tuesday<|end|>", "Wednesday<|end|>"]
    n_trained_eos = sum(l == tiny_tokenizer.eos_token_id for l in labels)
    assert n_trained_eos == 2  # only the assistant turns' end tokens, not the user/system ones
    assert sum(i == tiny_tokenizer.eos_token_id for i in ids) == 5


def test_an_answer_spelled_like_the_templates_own_tokens(tiny_tokenizer):
    """'end' stands inside the template's <|end|> right after the question: the answer is the 'end'
    followed by the end-of-turn, and the question the text followed by the user turn's end."""
    for messages in ([{"role": "user", "content": "What is the opposite of begin?"}, {"role": "assistant", "content": "end"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "end"},
                      {"role": "assistant", "content": "end"}]):
        ids, labels = tokens_and_labels(tiny_tokenizer, messages)
        assert trained_segments(tiny_tokenizer, ids, labels) == ["end<|end|>"]


def test_last_assistant_only(tiny_tokenizer):
    ids, labels = tokens_and_labels(tiny_tokenizer, MULTI, train_on="last_assistant")
    assert trained_segments(tiny_tokenizer, ids, labels) == ["Wednesday<|end|>"]


def test_spans_on_a_llama3_style_template():
    def render(messages, gen):
        out = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")
    assert end_of_turn_text(render) == "<|eot_id|>"
    done = render_spans(render, MULTI, "<|eot_id|>")
    assert [done.text[a:b] for a, b in done.spans] == ["Tuesday<|eot_id|>", "Wednesday<|eot_id|>"]
    assert done.prompt == render(MULTI[:-1], True)


def test_an_answer_quoted_in_the_prompt_is_not_the_trained_turn():
    """Turns are located in order: the assistant's 'Lima' is the one after the user's 'Lima'."""
    render = lambda msgs, gen: "".join(f"<{m['role']}>{m['content']}</s>" for m in msgs) + ("<assistant>" if gen else "")
    done = render_spans(render, [{"role": "user", "content": "Say Lima"}, {"role": "assistant", "content": "Lima"}], "</s>")
    assert done.spans == [(len("<user>Say Lima</s><assistant>"), len(done.text))]


def test_template_that_drops_an_assistant_turn_rejects_the_row():
    render = lambda msgs, gen: "|".join(m["content"] for m in msgs[-1:]) + (">" if gen else "")
    with pytest.raises(RowError, match="assistant turn 2 does not appear"):
        render_spans(render, MULTI, "")


def test_fast_render_equals_apply_chat_template(tiny_tokenizer):
    render = renderer(tiny_tokenizer, tiny_tokenizer.chat_template, dt.date(2026, 1, 1))
    for msgs in (SINGLE, MULTI, MULTI[:2]):
        for gen in (False, True):
            assert render(msgs, gen) == tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_labels_from_spans_pure():
    ids = [10, 11, 12, 13]
    offsets = [(0, 2), (2, 5), (5, 6), (6, 6)]
    assert labels_from_spans(ids, offsets, [(2, 6)]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX]


def test_labels_match_trl_completion_only(tiny_tokenizer, tiny_model_dir, tmp_path):
    """On prompt/completion rows, our labels equal those TRL's SFTTrainer builds with completion_only_loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from tasks.ingest import ingest

    raw = [
        {"prompt": [{"role": "user", "content": "What is the capital of Peru?"}],
         "completion": [{"role": "assistant", "content": "Lima"}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two and three."},
                    {"role": "assistant", "content": "five"}, {"role": "user", "content": "And four more?"}],
         "completion": [{"role": "assistant", "content": "nine"}]},
        {"prompt": "Tell me about the fox.", "completion": "The fox is a small animal that lives in the forest."},
    ]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # TRL's side: its own preprocessing of the same rows (string rows as single turns, as we ingest them)
    trl_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"],
                 "completion": [{"role": "assistant", "content": r["completion"]}] if isinstance(r["completion"], str) else r["completion"]}
                for r in raw]
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tok,
                         train_dataset=Dataset.from_list(trl_rows),
                         args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to="none",
                                        max_length=None, use_cpu=True))
    trl_labels = trainer.train_dataset["labels"]

    # our side: the ingest, template and tokenize stages' functions on the same rows as a JSONL file
    src = tmp_path / "pc.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in raw))
    ingested = ingest([str(src)])
    assert list(ingested["format"]) == ["prompt_completion"] * 3 and ingested["ingest_error"].isna().all()
    ours, rejects = tokenize_rows(templated(ingested, tok), tok, TokenizeParams())
    assert not rejects
    assert [list(l) for l in ours["labels"]] == [list(l) for l in trl_labels]
    assert any(l == IGNORE_INDEX for l in trl_labels[1])  # the comparison is not vacuous


def test_a_long_row_renders_a_constant_number_of_times(tiny_tokenizer):
    """Template time is linear in the turns: the conversation is rendered once (plus its generation
    prompt), not once per prefix, which made a 10,000-turn row take minutes."""
    base = renderer(tiny_tokenizer, tiny_tokenizer.chat_template, dt.date(2026, 1, 1))
    calls = []
    render = lambda messages, gen: calls.append(len(messages)) or base(messages, gen)
    messages = [m for i in range(100) for m in ({"role": "user", "content": f"Question {i}?"},
                                                 {"role": "assistant", "content": f"Answer {i}."})]
    done = render_spans(render, messages, end_of_turn_text(base), user_end=user_turn_end(base))
    assert len(done.spans) == 100 and len(calls) <= 2
