"""evaluate stage: greedy generation on the eval split by the base and the fine-tuned (merged)
model, ROUGE and exact-match accuracy for both, and an audit of every generation.

    python -m tasks.evaluate    (or: dvc repro evaluate)

Writes reports/scores/{base,tuned}.json (the measurements, DVC's metrics: `dvc metrics show -R
reports/scores`), reports/metrics.json (those with the settings, row counts, flag counts and the
golden set's scores), reports/generations.jsonl (every row, both models, with audit flags) and
reports/generation_audit.md (counts and rows side by side).

Imports neither prefect, dvc nor pandera: this stage also runs on minimal GPU machines.
"""
from __future__ import annotations

import logging

import pandas as pd

from loraflow import layout
from loraflow.artifacts import write_json, write_jsonl, write_text
from loraflow.audit import FLAGS, audit_flags
from loraflow.chat_format import ChatFormat, run_tokenizer
from loraflow.families import family_table
from loraflow.evaluation import (GenerationSettings, aggregate, eval_rows_sha256, generate_all, load_for_generation,
                                 load_metric, rows_of, score_rows)
from loraflow.modeling import BaseRef, resolve_base
from loraflow.params import EvaluateParams
from loraflow.stage import main

log = logging.getLogger("loraflow.evaluate")
MODELS = ("base", "tuned")


def eval_rows(params: EvaluateParams) -> pd.DataFrame:
    df = pd.read_parquet(layout.EVAL_TOKENS, columns=["id", "family", "prompt", "reference"])
    return df.sort_values("id").head(params.max_rows).reset_index(drop=True)


def scored_rows(params: EvaluateParams) -> pd.DataFrame:
    """The eval rows, then every golden row (ingest.golden_sources), each marked with its set."""
    golden = pd.read_parquet(layout.GOLDEN_TOKENS, columns=["id", "family", "prompt", "reference"])
    return pd.concat([eval_rows(params).assign(set="eval"), golden.sort_values("id").assign(set="golden")],
                     ignore_index=True)


def checkable_rows(rows: pd.DataFrame, params: EvaluateParams) -> list[bool]:
    """The rows exact match scores: those of evaluate.exact_match_families, or ([]) every row."""
    return list(rows["family"].isin(params.exact_match_families) if params.exact_match_families else rows["family"].notna())


def by_family(per_row: dict[str, dict[str, list]], rows: pd.DataFrame, eval_idx: list[int]) -> dict:
    """Each family's (task's) eval rows, exact match and ROUGE-L per model: a mean carried by one
    large family hides the others, so each is reported on its own."""
    out = {}
    for family in sorted({rows["family"].iloc[i] for i in eval_idx}):
        idx = [i for i in eval_idx if rows["family"].iloc[i] == family]
        label = family or "(no family)"  # rows of a source without a family or task column
        out[label] = {"rows": len(idx)}
        for name in MODELS:
            agg = aggregate(rows_of(per_row[name], idx))
            out[label][name] = {"exact_match": agg["exact_match"], "rougeL": agg["rougeL"]}
    return out


def markdown(metrics: dict, records: list[dict], samples: int) -> str:
    lines = ["# Generation audit: base vs fine-tuned", "",
             f"{metrics['rows']} eval rows, greedy, at most {metrics['max_new_tokens']} new tokens.", "",
             "| | " + " | ".join(MODELS) + " |", "|---|---|---|"]
    for key in ("exact_match", "rouge1", "rouge2", "rougeL"):
        lines.append(f"| {key} | " + " | ".join(str(metrics[m][key]) for m in MODELS) + " |")
    for flag in FLAGS:
        lines.append(f"| flagged {flag} | " + " | ".join(str(metrics[m]["flags"][flag]) for m in MODELS) + " |")
    lines += ["", "## By family", ""] + family_table(metrics["by_family"])
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


def references_over_cap(references: list[str], tokenizer, cap: int) -> dict | None:
    """How many references are longer (in tokens) than the generation cap: their generations are cut
    there, flagged no_eos and scored low for the cap's sake, not the model's. Warned, naming the cap."""
    # + 1: the end-of-turn token the model must also write within the cap
    needed = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references]
    over = [n for n in needed if n > cap]
    if not over:
        return None
    log.warning("%d of %d references need more than evaluate.max_new_tokens = %d tokens with their end of turn "
                "(the longest: %d): their generations are cut at the cap and flagged no_eos. Raise "
                "evaluate.max_new_tokens to score them whole.", len(over), len(references), cap, max(over))
    return {"rows": len(over), "longest_tokens": max(over), "cap": cap}


def prompt_text(prompt: str, tokenizer) -> str:
    """The prompt without special tokens: what an echo would repeat."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def run(params: EvaluateParams) -> dict:
    rows = scored_rows(params)
    sets = {name: [i for i, s in enumerate(rows["set"]) if s == name] for name in ("eval", "golden")}
    prompts = list(rows["prompt"])
    base_ref = resolve_base(layout.BASE_DIR)
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    tokenizer = run_tokenizer(base_ref, chat)
    settings = GenerationSettings.of(params)
    over_cap = references_over_cap(list(rows["reference"]), tokenizer, params.max_new_tokens)
    outputs = {"base": generate_all(load_for_generation(base_ref, tokenizer), tokenizer, prompts, chat, settings)}
    log.info("base model: %d generations", len(prompts))
    merged = BaseRef(str(layout.MERGED_DIR), trust_remote_code=base_ref.trust_remote_code)
    outputs["tuned"] = generate_all(load_for_generation(merged, tokenizer), tokenizer, prompts, chat, settings)
    log.info("fine-tuned model: %d generations", len(prompts))

    rouge, exact = load_metric("rouge"), load_metric("exact_match")
    checkable = checkable_rows(rows, params)
    golden = rows.iloc[sets["golden"]]
    metrics: dict = {"rows": len(sets["eval"]), "max_new_tokens": params.max_new_tokens, "references_over_cap": over_cap,
                     "eval_rows_sha256": eval_rows_sha256(rows.iloc[sets["eval"]]), "generation": settings.to_dict(),
                     "golden": {"rows": len(golden), "rows_sha256": eval_rows_sha256(golden)} if len(golden) else None}
    records = [{"id": r.id, "family": r.family, "set": r.set, "prompt": prompt_text(r.prompt, tokenizer),
                "reference": r.reference, "exact_match_checked": c} for r, c in zip(rows.itertuples(), checkable)]
    per_row = {}
    for name in MODELS:
        texts = [o["text"] for o in outputs[name]]
        per_row[name] = score_rows(texts, list(rows["reference"]), checkable, rouge, exact)
        metrics[name] = aggregate(rows_of(per_row[name], sets["eval"]))
        if metrics["golden"]:
            metrics["golden"][name] = aggregate(rows_of(per_row[name], sets["golden"]))
        counts = dict.fromkeys(FLAGS, 0)
        for i, (rec, out) in enumerate(zip(records, outputs[name])):
            flags = audit_flags(out["text"], out["ended"], rec["prompt"], ngram=params.repetition_ngram,
                                min_repeats=params.repetition_min_repeats, echo_min_chars=params.echo_min_chars)
            rec[name], rec[name + "_flags"], rec[name + "_new_tokens"] = out["text"], flags, out["new_tokens"]
            # each row's scores, for the gate's paired comparisons on these very rows
            rec[name + "_scores"] = {k: v[i] for k, v in per_row[name].items()}
            for f in flags if rec["set"] == "eval" else ():
                counts[f] += 1
        metrics[name]["flags"] = counts
    metrics["delta"] = {k: round(metrics["tuned"][k] - metrics["base"][k], 4)
                        for k in ("exact_match", "rouge1", "rouge2", "rougeL") if metrics["base"][k] is not None}
    metrics["by_family"] = by_family(per_row, rows, sets["eval"])
    write_json(layout.METRICS, metrics)
    for name in MODELS:
        write_json(layout.SCORES_DIR / f"{name}.json", {k: metrics[name][k] for k in layout.SCORE_KEYS})
    write_jsonl(layout.GENERATIONS, records)
    write_text(layout.GENERATION_AUDIT, markdown(metrics, records, params.samples_in_report))
    return {"rows": len(sets["eval"]), "golden_rows": len(sets["golden"]), **{f"{m}_{k}": metrics[m][k] for m in MODELS for k in ("exact_match", "rougeL")}}


if __name__ == "__main__":
    main("evaluate", run)
