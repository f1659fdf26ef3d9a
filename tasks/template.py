"""template stage: render each conversation with the chat template, and record which character
spans are trainable (the assistant turns with their end-of-turn).

    python -m tasks.template    (or: dvc repro template)

Also records, for evaluation, the prompt that precedes the last assistant turn and that turn's
answer as the reference, and writes the run's chat format (the template and its end-of-turn, one
fact for every later stage) to data/interim/chat_format.json. A row the template cannot render or
mask goes to data/interim/template_rejects.jsonl with its reason; the stage fails only when more
than template.max_reject_fraction of the rows do.
"""
from __future__ import annotations

import json
import logging

import pandas as pd

from loraflow import layout
from loraflow.artifacts import write_jsonl, write_parquet, write_text
from loraflow.chat_format import (ChatFormat, chat_format_for, escape_control_tokens, fold_system_prompt,
                                  generation_config_stop_ids)
from loraflow.errors import LoraflowError
from loraflow.masking import THINK_CLOSE, THINK_OPEN, RowError, render_spans, split_reasoning
from loraflow.modeling import load_tokenizer, resolve_base
from loraflow.params import TemplateParams
from loraflow.stage import main

log = logging.getLogger("loraflow.template")


def prepare_messages(messages: list[dict], params: TemplateParams, control: list[str] = ()) -> list[dict]:
    """The row's turns as the template gets them: control tokens refused or escaped, reasoning dropped,
    or the system prompt folded, when params say so."""
    escaped = []
    for i, m in enumerate(messages):
        # an answer's own <think>...</think> block is the reasoning format, not an injection
        tokens = [t for t in control if m["role"] != "assistant" or t not in (THINK_OPEN, THINK_CLOSE)]
        found = next((t for t in tokens if t in m["content"]), None)
        if found and params.control_tokens == "reject":
            raise RowError(f"turn {i} ({m['role']}) contains the control token {found!r}: it would be read as the "
                           "template's own token and could inject a turn; remove it, or set "
                           "template.control_tokens: escape")
        escaped.append({**m, "content": escape_control_tokens(m["content"], tokens)} if found else m)
    messages = escaped
    if params.reasoning == "drop":
        messages = [{**m, "content": split_reasoning(m["content"])[1].strip()} if m["role"] == "assistant" else m
                    for m in messages]
    if params.system_role == "fold":
        messages = fold_system_prompt(messages)
    return messages


def template_rows(df: pd.DataFrame, render, chat: ChatFormat, params: TemplateParams) -> tuple[pd.DataFrame, list[dict]]:
    """Rendered rows with their trainable spans, and the rows the template could not take, with reasons."""
    out, rejects = [], []
    for row in df.itertuples(index=False):
        messages = json.loads(row.messages)
        try:
            messages = prepare_messages(messages, params, chat.control_tokens)
            done = render_spans(render, messages, chat.end_of_turn, params.train_on, int(getattr(row, "trainable_from", 0)),
                                chat.user_end)
        except RowError as e:
            fix = (" (template.system_role: fold prepends it to the first user turn)"
                   if messages[0]["role"] == "system" and "ystem" in str(e) else "")
            rejects.append({"id": row.id, "source": row.source, "line": int(row.line), "reasons": [f"{e}{fix}"]})
            continue
        out.append({"id": row.id, "family": row.family, "source": row.source, "line": row.line,
                    "text": done.text, "spans": json.dumps(done.spans), "n_turns": len(messages),
                    "prompt": done.prompt, "reference": split_reasoning(messages[-1]["content"])[1].strip()})
    return pd.DataFrame(out, columns=["id", "family", "source", "line", "text", "spans", "n_turns", "prompt",
                                      "reference"]), rejects


def run(params: TemplateParams) -> dict:
    ref = resolve_base(layout.BASE_DIR)
    tokenizer = load_tokenizer(ref)
    # the bundled base was pretrained on plain text: like any base checkpoint, it never saw its chat tokens
    bundled = ref.location == str(layout.BASE_DIR) and layout.BUILD_INFO.exists()
    render, chat = chat_format_for(tokenizer, params, generation_config_stop_ids(ref.location, ref.revision),
                                   base_knows_chat_tokens=not bundled)
    df = pd.read_parquet(layout.VALIDATED)
    out, rejects = template_rows(df, render, chat, params)
    write_jsonl(layout.TEMPLATE_REJECTS, rejects)
    if len(df) and len(rejects) / len(df) > params.max_reject_fraction:
        first = rejects[0]
        raise LoraflowError(f"{len(rejects)} of {len(df)} rows could not be templated, over "
                            f"template.max_reject_fraction={params.max_reject_fraction}; the first, "
                            f"{first['source']}:{first['line']}: {first['reasons'][0]}. Every one is in "
                            f"{layout.TEMPLATE_REJECTS}")
    write_parquet(layout.TEMPLATED, out)
    write_text(layout.CHAT_FORMAT, chat.to_json())
    log.info("end of turn %r (ids %s); generation stops on ids %s", chat.end_of_turn, chat.end_of_turn_ids, chat.stop_ids)
    if chat.added_tokens:
        log.info("added to the tokenizer: %s", " ".join(chat.added_tokens))
    return {"rows": len(out), "rejected": len(rejects), "multi_turn_rows": int((out["n_turns"] > 2).sum()),
            "trainable_spans": int(out["spans"].map(lambda s: len(json.loads(s))).sum()),
            "chat_template": params.chat_template, "end_of_turn": chat.end_of_turn, "stop_ids": chat.stop_ids,
            "added_tokens": chat.added_tokens, "untrained_tokens": chat.untrained_tokens}


if __name__ == "__main__":
    main("template", run)
