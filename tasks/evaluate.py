"""evaluate stage: greedy generation on the eval split by the base and the fine-tuned (merged)
model, ROUGE and exact-match accuracy for both, and an audit of every generation.

    python -m tasks.evaluate    (or: dvc repro evaluate)

Writes reports/metrics.json (for `dvc metrics show`), reports/generations.jsonl (every row, both
models, with audit flags) and reports/generation_audit.md (counts and rows side by side).

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

import loraflow
from loraflow import layout, memplan
from loraflow.artifacts import write_json, write_jsonl, write_text
from loraflow.audit import FLAGS, audit_flags
from loraflow.chat_format import ChatFormat, strip_reasoning
from loraflow.generation import generate_texts
from loraflow.modeling import BaseRef, compute_dtype, device, load_model, load_tokenizer, release_memory, resolve_base
from loraflow.params import EvaluateParams
from loraflow.stage import main

log = logging.getLogger("loraflow.evaluate")
METRICS_DIR = Path(loraflow.__file__).resolve().parent / "metrics"  # shipped modules, loaded by path
MODELS = ("base", "tuned")


def load_metric(name: str):
    import evaluate
    return evaluate.load(str(METRICS_DIR / name))


def eval_rows(params: EvaluateParams) -> pd.DataFrame:
    df = pd.read_parquet(layout.EVAL_TOKENS, columns=["id", "family", "prompt", "reference"])
    return df.sort_values("id").head(params.max_rows).reset_index(drop=True)


def generate_all(ref: BaseRef, tokenizer, prompts: list[str], chat: ChatFormat, params: EvaluateParams) -> list[dict]:
    model = load_model(ref, compute_dtype("auto")).to(device()).eval()
    batch = generation_batch_size(model, tokenizer, prompts, params)
    log.info("generating %d rows in batches of %d", len(prompts), batch)
    out = generate_texts(model, tokenizer, prompts, stop_ids=chat.stop_ids, end_of_turn=chat.end_of_turn,
                         max_new_tokens=params.max_new_tokens, batch_size=batch)
    if params.strip_reasoning:
        out = [{**o, "text": strip_reasoning(o["text"])} for o in out]
    del model
    release_memory()
    return out


def generation_batch_size(model, tokenizer, prompts: list[str], params: EvaluateParams) -> int:
    """params.batch_size, or (auto) what the memory plan fits beside the loaded weights; 32 on CPU."""
    if params.batch_size != "auto":
        return params.batch_size
    if not torch.cuda.is_available():
        return 32
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return memplan.generation_batch(memplan.Arch.from_config(model.config), longest, params.max_new_tokens,
                                    torch.cuda.mem_get_info()[0], len(prompts), act_bytes=model.dtype.itemsize)


def score(rows: pd.DataFrame, outputs: list[str], params: EvaluateParams, rouge, exact) -> dict:
    rouge_scores = rouge.compute(predictions=outputs, references=list(rows["reference"]))
    checkable = rows["family"].isin(params.exact_match_families) if params.exact_match_families else rows["family"].notna()
    em_preds = [o for o, c in zip(outputs, checkable) if c]
    em = exact.compute(predictions=em_preds, references=list(rows.loc[checkable, "reference"]))["exact_match"] if em_preds else None
    return {**{k: round(v, 4) for k, v in rouge_scores.items()},
            "exact_match": round(em, 4) if em is not None else None, "exact_match_rows": len(em_preds)}


def markdown(metrics: dict, records: list[dict], samples: int) -> str:
    lines = ["# Generation audit: base vs fine-tuned", "",
             f"{metrics['rows']} eval rows, greedy, at most {metrics['max_new_tokens']} new tokens.", "",
             "| | " + " | ".join(MODELS) + " |", "|---|---|---|"]
    for key in ("exact_match", "rouge1", "rouge2", "rougeL"):
        lines.append(f"| {key} | " + " | ".join(str(metrics[m][key]) for m in MODELS) + " |")
    for flag in FLAGS:
        lines.append(f"| flagged {flag} | " + " | ".join(str(metrics[m]["flags"][flag]) for m in MODELS) + " |")
    lines += ["", "## Rows side by side", "", "| id | family | prompt | reference | base | tuned |", "|---|---|---|---|---|---|"]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ⏎ ")[:160]
    for r in spread_over_families(records, samples):
        show = lambda m: cell(r[m]) + (f" **[{', '.join(r[m + '_flags'])}]**" if r[m + "_flags"] else "")
        lines.append(f"| {r['id']} | {r['family']} | {cell(r['prompt'])} | {cell(r['reference'])} | {show('base')} | {show('tuned')} |")
    return "\n".join(lines) + "\n"


def spread_over_families(records: list[dict], n: int) -> list[dict]:
    """Up to n records, taking one family after another so every family shows."""
    by_family: dict[str, list[dict]] = {}
    for r in records:
        by_family.setdefault(r["family"], []).append(r)
    picked, queues = [], list(by_family.values())
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def prompt_text(prompt: str, tokenizer) -> str:
    """The prompt without special tokens: what an echo would repeat."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def run(params: EvaluateParams) -> dict:
    rows = eval_rows(params)
    prompts = list(rows["prompt"])
    base_ref = resolve_base(layout.BASE_DIR)
    tokenizer = load_tokenizer(base_ref)
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    outputs = {"base": generate_all(base_ref, tokenizer, prompts, chat, params)}
    log.info("base model: %d generations", len(prompts))
    outputs["tuned"] = generate_all(BaseRef(str(layout.MERGED_DIR), trust_remote_code=base_ref.trust_remote_code),
                                    tokenizer, prompts, chat, params)
    log.info("fine-tuned model: %d generations", len(prompts))

    rouge, exact = load_metric("rouge"), load_metric("exact_match")
    metrics: dict = {"rows": len(rows), "max_new_tokens": params.max_new_tokens}
    records = [{"id": r.id, "family": r.family, "prompt": prompt_text(r.prompt, tokenizer), "reference": r.reference}
               for r in rows.itertuples()]
    for name in MODELS:
        texts = [o["text"] for o in outputs[name]]
        metrics[name] = score(rows, texts, params, rouge, exact)
        counts = dict.fromkeys(FLAGS, 0)
        for rec, out in zip(records, outputs[name]):
            flags = audit_flags(out["text"], out["ended"], rec["prompt"], ngram=params.repetition_ngram,
                                min_repeats=params.repetition_min_repeats, echo_min_chars=params.echo_min_chars)
            rec[name], rec[name + "_flags"], rec[name + "_new_tokens"] = out["text"], flags, out["new_tokens"]
            for f in flags:
                counts[f] += 1
        metrics[name]["flags"] = counts
    metrics["delta"] = {k: round(metrics["tuned"][k] - metrics["base"][k], 4)
                        for k in ("exact_match", "rouge1", "rouge2", "rougeL") if metrics["base"][k] is not None}
    write_json(layout.METRICS, metrics)
    write_jsonl(layout.GENERATIONS, records)
    write_text(layout.GENERATION_AUDIT, markdown(metrics, records, params.samples_in_report))
    return {"rows": len(rows), **{f"{m}_{k}": metrics[m][k] for m in MODELS for k in ("exact_match", "rougeL")}}


if __name__ == "__main__":
    main("evaluate", run)
