"""tokenize stage: input_ids and labels (-100 outside the trainable spans), a deterministic
train/eval split by id hash, and the mask audit.

    python -m tasks.tokenize    (or: dvc repro tokenize)

Rows over tokenize.max_length are dropped or truncated as params say, and rows left with no
trained token go to data/processed/rejects.jsonl with their reason; every one is counted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging

import numpy as np
import pandas as pd

from loraflow import layout
from loraflow.artifacts import atomic_path, spreadsheet_safe, write_json, write_jsonl, write_parquet, write_text
from loraflow.chat_format import ChatFormat, run_tokenizer
from loraflow.errors import LoraflowError
from loraflow.masking import IGNORE_INDEX, label_array
from loraflow.modeling import resolve_base
from loraflow.params import TokenizeParams
from loraflow.plots import histograms
from loraflow.text import squash
from loraflow.stage import main

log = logging.getLogger("loraflow.tokenize")


def in_eval_split(row_id: str, salt: str, eval_fraction: float) -> bool:
    """Stable across runs and machines, and independent of row order or of other rows."""
    digest = hashlib.sha256(f"{salt}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def tokenize_rows(df: pd.DataFrame, tokenizer, params: TokenizeParams) -> tuple[pd.DataFrame, list[dict]]:
    """Tokenized rows that keep at least one trained token, and the rows set aside with reasons."""
    # The Rust tokenizer directly: the same ids and offsets as tokenizer(..., return_offsets_mapping=True),
    # without transformers' per-row Python conversion, which costs as much as the tokenization itself.
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    kept, rejects = [], []
    for start in range(0, len(df), params.batch_size):
        chunk = df.iloc[start:start + params.batch_size]
        encodings = backend.encode_batch(list(chunk["text"]), add_special_tokens=False)
        for row, enc in zip(chunk.itertuples(index=False), encodings):
            ids = np.asarray(enc.ids, dtype=np.int32)
            labels = label_array(ids, enc.offsets, json.loads(row.spans))
            truncated = False
            if len(ids) > params.max_length:
                if params.overflow == "drop":
                    rejects.append({"id": row.id, "source": row.source, "line": row.line,
                                    "reasons": [f"{len(ids)} tokens, over tokenize.max_length={params.max_length} (overflow: drop)"]})
                    continue
                ids, labels, truncated = ids[:params.max_length], labels[:params.max_length], True
            trained = int((labels != IGNORE_INDEX).sum())
            if trained == 0:
                rejects.append({"id": row.id, "source": row.source, "line": row.line,
                                "reasons": ["no trained tokens" + (" left after truncation" if truncated else "")]})
                continue
            kept.append({"id": row.id, "family": row.family, "source": row.source, "line": int(row.line),
                         "input_ids": ids, "labels": labels,
                         "length": len(ids), "trained_tokens": trained, "truncated": truncated,
                         "prompt": row.prompt, "reference": row.reference})
    return pd.DataFrame(kept), rejects


def set_golden_apart(tokens: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(golden rows, the rest): rows of ingest.golden_sources are scored, never trained on or split."""
    is_golden = tokens["source"].str.startswith(layout.GOLDEN_SOURCE)
    return tokens[is_golden].reset_index(drop=True), tokens[~is_golden].reset_index(drop=True)


def keep_golden_out_of_training(train: pd.DataFrame, golden: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Train rows asking a golden prompt (up to case and whitespace) would teach the golden answers:
    removed from train, each to the rejects with its reason."""
    if golden.empty:
        return train, []
    leaked = train["prompt"].map(squash).isin(set(golden["prompt"].map(squash)))
    rejects = [{"id": r.id, "source": r.source, "line": int(r.line),
                "reasons": ["leakage: the same prompt is in the golden set (removed from train)"]}
               for r in train[leaked].itertuples()]
    return train[~leaked].reset_index(drop=True), rejects


def split_with_leakage_check(tokens: pd.DataFrame, params: TokenizeParams) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Train and eval rows; eval rows whose prompt (up to case and whitespace) is also a train
    prompt are leakage: removed to the rejects, fatal, or kept, as tokenize.leakage says."""
    is_eval = np.array([in_eval_split(i, params.split_seed, params.eval_fraction) for i in tokens["id"]], dtype=bool)
    train, evals = tokens[~is_eval].reset_index(drop=True), tokens[is_eval].reset_index(drop=True)
    train_prompts = set(train["prompt"].map(squash))
    leaked = evals["prompt"].map(squash).isin(train_prompts)
    rejects = [{"id": r.id, "source": r.source, "line": int(r.line),
                "reasons": ["leakage: the same prompt is in the train split (removed from eval)"]}
               for r in evals[leaked].itertuples()]
    if leaked.any() and params.leakage == "fail":
        raise LoraflowError(f"{int(leaked.sum())} eval rows share their prompt with train rows (e.g. id "
                            f"{evals[leaked]['id'].iloc[0]}); deduplicate the data, or set tokenize.leakage: remove")
    if params.leakage == "remove":
        evals = evals[~leaked].reset_index(drop=True)
    else:
        rejects = []
    return train, evals, rejects


def mark_trained(tokenizer, ids: list[int], labels: list[int]) -> str:
    """Render a row with its trained tokens between ⟦ and ⟧, for eyes."""
    out, inside = [], False
    for tok, lab in zip(ids, labels):
        tok, lab = int(tok), int(lab)
        trained = lab != IGNORE_INDEX
        if trained != inside:
            out.append("⟦" if trained else "⟧")
            inside = trained
        out.append(tokenizer.decode([tok]))
    return "".join(out) + ("⟧" if inside else "")


def mask_audit(df: pd.DataFrame, tokenizer, rejects: list[dict], end_of_turn_ids: list[int], examples: int = 4) -> dict:
    # The end-of-turn's last token marks where a turn ends (the whole text when it is one special token).
    eot = end_of_turn_ids[-1]
    n_eos_trained = df["labels"].map(lambda ls: int((np.asarray(ls) == eot).sum()))
    n_eos_total = df["input_ids"].map(lambda ids: int((np.asarray(ids) == eot).sum()))
    return {
        "rows": len(df), "tokens": int(df["length"].sum()), "trained_tokens": int(df["trained_tokens"].sum()),
        "trained_fraction_mean": round(float((df["trained_tokens"] / df["length"]).mean()), 4),
        "length": {"min": int(df["length"].min()), "median": float(df["length"].median()), "max": int(df["length"].max())},
        "truncated_rows": int(df["truncated"].sum()), "rejected_rows": len(rejects),
        # Every assistant turn must teach the model to stop: its end-of-turn token is trained.
        "rows_without_trained_eos": int((n_eos_trained == 0).sum()),
        "untruncated_rows_without_trained_eos": int(((n_eos_trained == 0) & ~df["truncated"].astype(bool)).sum()),
        "eos_tokens_trained": int(n_eos_trained.sum()), "eos_tokens_total": int(n_eos_total.sum()),
        "examples": [mark_trained(tokenizer, r.input_ids, r.labels) for r in df.head(examples).itertuples()],
    }


def check_end_of_turn_trained(audit: dict, chat: ChatFormat) -> None:
    """Every untruncated row must train its end-of-turn, or the model never learns to stop. Checked
    when the end-of-turn is one token; a text end-of-turn (a base model's named template) may merge
    with what follows it, so there the count is reported, not enforced."""
    missing = audit["untruncated_rows_without_trained_eos"]
    if missing and len(chat.end_of_turn_ids) == 1:
        raise LoraflowError(f"{missing} untruncated rows train no end-of-turn {chat.end_of_turn!r}: the model would "
                            f"not learn to stop. See {layout.MASK_AUDIT_MD}; set template.end_of_turn if the "
                            "template ends turns otherwise")
    if missing:
        log.warning("%d untruncated rows show no trained %r token (a multi-token end-of-turn)", missing, chat.end_of_turn)


def audit_markdown(audit: dict) -> str:
    lines = ["# Mask audit", "",
             f"{audit['rows']} rows, {audit['tokens']} tokens, {audit['trained_tokens']} trained "
             f"(mean trained fraction {audit['trained_fraction_mean']:.1%}).",
             f"Lengths: min {audit['length']['min']}, median {audit['length']['median']}, max {audit['length']['max']}. "
             f"Truncated rows: {audit['truncated_rows']}. Rejected rows: {audit['rejected_rows']}.",
             f"End-of-turn ({audit.get('end_of_turn')!r}) tokens trained: {audit['eos_tokens_trained']} of "
             f"{audit['eos_tokens_total']}; "
             f"rows with no trained end-of-turn: **{audit['rows_without_trained_eos']}**.",
             f"Eval rows removed for leakage (prompt also in train): {audit.get('leakage_removed_from_eval', 0)}.", "",
             "Per-row counts: reports/mask_audit_rows.csv; histograms: reports/mask_audit.png.", "",
             "## Examples (trained tokens between ⟦ ⟧)", ""]
    for ex in audit["examples"]:
        lines += ["```", ex, "```", ""]
    return "\n".join(lines)


def run(params: TokenizeParams) -> dict:
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    tokenizer = run_tokenizer(resolve_base(layout.BASE_DIR), chat)
    df = pd.read_parquet(layout.TEMPLATED)
    tokens, rejects = tokenize_rows(df, tokenizer, params)
    if tokens.empty:
        raise LoraflowError(f"no row is left to train on: all {len(df)} were set aside ({rejects[0]['reasons'][0]} ...); "
                            f"see {layout.TOKENIZE_REJECTS} reasons, e.g. raise tokenize.max_length (now "
                            f"{params.max_length})" if rejects else "no rows to tokenize")
    golden, tokens = set_golden_apart(tokens)
    train, evals, leaked = split_with_leakage_check(tokens, params)
    train, golden_leaks = keep_golden_out_of_training(train, golden)
    leaked += golden_leaks
    if train.empty or evals.empty:
        empty = "train" if train.empty else "eval"
        raise LoraflowError(f"the {empty} split is empty ({len(train)} train, {len(evals)} eval rows of {len(tokens)}): "
                            f"{'lower' if train.empty else 'raise'} tokenize.eval_fraction (now {params.eval_fraction}) "
                            "or add rows")
    write_parquet(layout.TRAIN_TOKENS, train)
    write_parquet(layout.EVAL_TOKENS, evals)
    write_parquet(layout.GOLDEN_TOKENS, golden)
    write_jsonl(layout.TOKENIZE_REJECTS, rejects + leaked)
    audit = mask_audit(tokens, tokenizer, rejects, chat.end_of_turn_ids)
    audit["end_of_turn"] = chat.end_of_turn
    check_end_of_turn_trained(audit, chat)
    audit["leakage_removed_from_eval"] = len(leaked)
    write_mask_audit_rows(tokens)
    write_json(layout.MASK_AUDIT_JSON, audit)
    write_text(layout.MASK_AUDIT_MD, audit_markdown(audit))
    return {"rows_in": len(df), "train_rows": len(train), "eval_rows": len(evals), "golden_rows": len(golden),
            "rejected": len(rejects),
            "leakage_removed": len(leaked), "truncated": audit["truncated_rows"], "trained_tokens": audit["trained_tokens"]}


def write_mask_audit_rows(tokens: pd.DataFrame) -> None:
    """Per-row counts (a CSV DVC can plot) and histograms of lengths and trained fractions (PNG)."""
    rows = pd.DataFrame({"id": tokens["id"].map(spreadsheet_safe), "length": tokens["length"], "trained_tokens": tokens["trained_tokens"],
                         "trained_fraction": (tokens["trained_tokens"] / tokens["length"]).round(4)})
    with atomic_path(layout.MASK_AUDIT_ROWS) as tmp:
        rows.to_csv(tmp, index=False)
    histograms(layout.MASK_AUDIT_PNG, {"sequence length (tokens)": rows["length"],
                                       "trained fraction of the row": rows["trained_fraction"]},
               title=f"mask audit: {len(rows)} rows")


if __name__ == "__main__":
    main("tokenize", run)
