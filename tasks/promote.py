"""promote stage: the promotion gate. The new adapter (the challenger) is promoted only if, on every
gated metric, it beats the base model and the promoted adapter (the champion) beyond the noise of
the eval sample, by the margins in params.promote.

    python -m tasks.promote     (or: dvc repro promote)

All three are scored on the very same rows: the evaluate stage's per-row scores of the base and the
challenger (reports/generations.jsonl), and the champion generated here on those rows with
evaluate's settings (it lives in models/promoted, which only this stage may read: a stage before
the gate reading the gate's registry would be a cycle in the DVC graph). Each comparison is the mean
per-row difference with a paired bootstrap interval (loraflow/significance.py); it passes when the
interval's lower bound clears the margin, and says "not significant" when only the noise stands in
the way. Per-family slices show a task that regressed even when the mean rose.

models/promoted/ holds the promoted adapter with its metrics and the decision that promoted it; it
persists across runs (DVC versions each state). reports/promotion.{json,md} record every decision,
promoted or not, with its reasons.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from loraflow import data_changes, layout
from loraflow.artifacts import atomic_path, read_jsonl, sha256_tree, write_json, write_text
from loraflow.chat_format import ChatFormat, run_tokenizer, save_chat_format
from loraflow.evaluation import (GenerationSettings, aggregate, generate_all, load_for_generation, load_metric,
                                 rows_of, score_rows)
from loraflow.model_card import card_data, model_card
from loraflow.modeling import resolve_base
from loraflow.params import PromoteParams
from loraflow.significance import Difference, paired_bootstrap
from loraflow.stage import main

log = logging.getLogger("loraflow.promote")
TRAIN_MANIFEST = "train_rows.parquet"  # in the registry: the champion's training rows (id, family, length)


def row_scores(records: list[dict], model: str, metric: str) -> list[float | None]:
    return [r[f"{model}_scores"][metric] for r in records]


def compare(a: list, b: list, params: PromoteParams) -> Difference | None:
    return paired_bootstrap(a, b, resamples=params.bootstrap_resamples, confidence=params.confidence)


def rival_differences(records: list[dict], champion: dict[str, list] | None, params: PromoteParams):
    """(metric, rival, Difference or None) for each gated metric: the challenger against the base
    and, when scored, the champion, on these rows."""
    for key in params.metrics:
        tuned = row_scores(records, "tuned", key)
        rivals = {"base": row_scores(records, "base", key)} | ({"champion": champion[key]} if champion else {})
        for rival, scores in rivals.items():
            yield key, rival, compare(tuned, scores, params)


def decide(records: list[dict], champion: dict[str, list] | None, params: PromoteParams
           ) -> tuple[bool, list[str], dict]:
    """(promote?, reasons, comparisons): each rival difference must clear its margin; one reason per
    comparison, passed or not."""
    reasons, comparisons, ok = [], {k: {} for k in params.metrics}, True
    margins = {"base": params.min_gain_over_base, "champion": params.min_gain_over_promoted}
    for key, rival, d in rival_differences(records, champion, params):
        if d is None:
            ok = False
            reasons.append(f"{key}: no row scored by both the challenger and the {rival}")
            continue
        margin = margins[rival]
        verdict = d.verdict(margin)
        ok &= verdict == "pass"
        comparisons[key][rival] = {**d.to_dict(), "margin": margin, "verdict": verdict}
        reasons.append(f"{key}: challenger vs {rival} {d.describe()}; needs the interval above "
                       f"{margin:+g}: {verdict}")
    return ok, reasons, comparisons


def golden_comparisons(records: list[dict], champion: dict[str, list] | None, params: PromoteParams
                       ) -> tuple[bool, list[str], dict]:
    """The same comparisons on the golden set. It is small and fixed, so it vetoes rather than
    decides: the challenger fails only where it is worse than the champion beyond the noise."""
    reasons, comparisons, ok = [], {k: {} for k in params.metrics}, True
    for key, rival, d in rival_differences(records, champion, params):
        if d is None:
            continue
        verdict = "regression" if rival == "champion" and d.high < 0 else "no regression"
        ok &= verdict != "regression"
        comparisons[key][rival] = {**d.to_dict(), "verdict": verdict}
        reasons.append(f"golden set, {key}: challenger vs {rival} {d.describe()}"
                       + (f": {verdict}" if rival == "champion" else ""))
    return ok, reasons, comparisons


def family_slices(records: list[dict], champion: dict[str, list] | None, params: PromoteParams) -> dict:
    """Per family (task), each gated metric's mean for every model and the challenger's difference
    from the champion (else the base) with its interval: a regression on one task shows here."""
    rival = "champion" if champion is not None else "base"
    out = {}
    for family in sorted({r["family"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["family"] == family]
        out[family] = {}
        for key in params.metrics:
            pick = lambda scores: [scores[i] for i in idx]
            scores = {"base": pick(row_scores(records, "base", key)), "tuned": pick(row_scores(records, "tuned", key))}
            if champion is not None:
                scores["champion"] = pick(champion[key])
            d = compare(scores["tuned"], scores[rival], params)
            if d is None:
                continue
            means = {m: round(sum(v for v in s if v is not None) / max(sum(v is not None for v in s), 1), 4)
                     for m, s in scores.items()}
            out[family][key] = {**means, "difference": d.to_dict(), "regression": d.high < 0}
    return out


def score_champion(records: list[dict], adapter_dir: Path, settings: dict) -> tuple[dict | None, str | None]:
    """The champion's per-row scores on these rows, generated as evaluate generated; or None and why not."""
    ref = resolve_base(layout.BASE_DIR)
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    tokenizer = run_tokenizer(ref, chat)
    prompts = pd.concat([pd.read_parquet(p, columns=["id", "prompt"]) for p in (layout.EVAL_TOKENS, layout.GOLDEN_TOKENS)]
                        ).set_index("id")["prompt"]
    try:
        model = load_for_generation(ref, tokenizer, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:  # trained on another base or another vocabulary
        return None, f"the champion adapter does not load onto this run's base ({str(e).splitlines()[0][:200]})"
    outs = generate_all(model, tokenizer, [prompts[r["id"]] for r in records], chat, GenerationSettings(**settings))
    per_row = score_rows([o["text"] for o in outs], [r["reference"] for r in records],
                         [r["exact_match_checked"] for r in records], load_metric("rouge"), load_metric("exact_match"))
    return per_row, None


def scope_of(promoted: dict) -> str:
    """The registry entry's promote.scope; entries from before scopes existed are the default one's."""
    return promoted.get("scope", "default")


def not_a_rival(promoted: dict, base_sha256: str, scope: str) -> str | None:
    """Why the promoted adapter cannot be this run's champion, or None when it can: another scope's
    adapter (other data, another task), or one trained on another base model, whose scores on this
    base would mean nothing even where its weights load."""
    if scope_of(promoted) != scope:
        return (f"the promoted adapter belongs to promote.scope {scope_of(promoted)!r} and this run's is "
                f"{scope!r}, so it is no rival (a promotion replaces it; DVC keeps its history)")
    if promoted.get("base_sha256") not in (None, base_sha256):
        return (f"the promoted adapter was trained on another base model (models/base sha256 "
                f"{promoted['base_sha256'][:12]}, this run's {base_sha256[:12]})")
    return None


def compared_against(decision: dict, promoted: dict | None) -> str:
    """One line on what the challenger was measured against: said first, so that a run on new data
    never reads as a comparison it was not."""
    if decision["champion"] is None:
        return "Compared against: the base model only."
    c = decision["champion"]
    return (f"Compared against: the base model and the promoted adapter {c['adapter_sha256'][:12]} (scope "
            f"{decision['scope']!r}, promoted on eval rows {promoted['eval_rows_sha256'][:12]}), both on this run's rows.")


def report(decision: dict) -> str:
    verdict = "PROMOTED" if decision["promoted"] else "NOT promoted"
    lines = [f"# Promotion gate: {verdict}", "", decision["compared_against"], "", f"Eval rows: {decision['eval_rows']} "
             f"(content sha256 {decision['eval_rows_sha256'][:12]}); every model scored on these rows.", ""]
    lines += [f"- {r}" for r in decision["reasons"]]
    if decision.get("data_since_champion"):
        c = decision["data_since_champion"]
        lines += ["", f"Training data since the champion: {c['added']} rows added, {c['removed']} removed"
                  + (f"; families appeared: {', '.join(c['families_appeared'])}" if c["families_appeared"] else "")
                  + (f"; vanished: {', '.join(c['families_vanished'])}" if c["families_vanished"] else "")
                  + " (reports/data_changes.md)."]
    if decision["families"]:
        lines += ["", f"## By family (challenger vs {decision['families_vs']})", "",
                  "| family | metric | base | champion | challenger | difference (interval) | |", "|---|---|---|---|---|---|---|"]
        for family, metrics in decision["families"].items():
            for key, s in metrics.items():
                d = s["difference"]
                flag = "**regression**" if s["regression"] else ""
                lines.append(f"| {family} | {key} | {s['base']} | {s.get('champion', '-')} | {s['tuned']} | "
                             f"{d['difference']:+.4f} ({d['low']:+.4f} to {d['high']:+.4f}, {d['rows']} rows) | {flag} |")
    return "\n".join(lines) + "\n"


def write_handoff(out_dir: Path, decision: dict) -> None:
    """Beside the adapter: the tokenizer with the chat template it was trained with, a
    generation_config.json that stops where training taught it to stop, and the model card."""
    chat = ChatFormat.read(layout.CHAT_FORMAT)
    ref = resolve_base(layout.BASE_DIR)
    save_chat_format(out_dir, run_tokenizer(ref, chat), chat)
    train_info = json.loads((layout.ADAPTER_DIR / "train_info.json").read_text())
    write_text(out_dir / "README.md", model_card(f"{ref.location}: the promoted LoRA adapter", train_info, chat,
                                                 card_data(train_info), decision=decision))


def data_since_champion(promoted: dict | None, current: pd.DataFrame, scope: str) -> dict | None:
    """Write reports/data_changes.{json,md}: this run's training rows (their manifest) against the champion's."""
    kept = layout.PROMOTED_DIR / TRAIN_MANIFEST
    changes, why_none = None, ""
    if promoted is None:
        why_none = "No adapter was promoted before: nothing to compare with."
    elif scope_of(promoted) != scope:
        why_none = f"The promoted adapter belongs to another promote.scope ({scope_of(promoted)!r}): no champion to compare with."
    elif not kept.exists():
        why_none = "The champion was promoted without a manifest of its training rows (an older loraflow)."
    else:
        changes = data_changes.compare(pd.read_parquet(kept), current)
    write_json(layout.DATA_CHANGES_JSON, {"changes": changes, "why_none": why_none or None})
    write_text(layout.DATA_CHANGES_MD, data_changes.markdown(changes, why_none))
    return changes


def run(params: PromoteParams) -> dict:
    metrics = json.loads(layout.METRICS.read_text())
    records = read_jsonl(layout.GENERATIONS)
    record_file = layout.PROMOTED_DIR / "promotion.json"
    promoted = json.loads(record_file.read_text()) if record_file.exists() else None
    adapter_sha, base_sha = sha256_tree(layout.ADAPTER_DIR), sha256_tree(layout.BASE_DIR)
    champion, why_not, pre = None, None, []
    if promoted is not None and promoted["adapter_sha256"] == adapter_sha:
        pre = ["this adapter is already the promoted one"]
    elif promoted is not None:
        why_not = not_a_rival(promoted, base_sha, params.scope)
        if why_not is None:
            champion, why_not = score_champion(records, layout.PROMOTED_DIR / "adapter", metrics["generation"])
    # the champion was scored on every row; the eval rows decide, the golden rows can veto
    eval_idx = [i for i, r in enumerate(records) if r["set"] == "eval"]
    golden_idx = [i for i, r in enumerate(records) if r["set"] == "golden"]
    evals = [records[i] for i in eval_idx]
    champion_evals = champion and rows_of(champion, eval_idx)
    ok, reasons, comparisons = decide(evals, champion_evals, params)
    golden = None
    if golden_idx:
        golden_ok, golden_reasons, golden_cmp = golden_comparisons([records[i] for i in golden_idx],
                                                                   champion and rows_of(champion, golden_idx), params)
        ok &= golden_ok
        reasons += golden_reasons
        golden = {"rows": len(golden_idx), "rows_sha256": metrics["golden"]["rows_sha256"], "comparisons": golden_cmp}
    manifest = data_changes.manifest(pd.read_parquet(layout.TRAIN_TOKENS, columns=data_changes.MANIFEST_COLUMNS))
    changes = data_since_champion(promoted, manifest, params.scope)
    if pre:
        ok, reasons = False, pre + reasons
    elif promoted is None:
        reasons.append("no adapter promoted before: compared with the base only")
    elif why_not:
        reasons.append(f"{why_not}: compared with the base only")
    decision = {"promoted": ok, "reasons": reasons, "adapter_sha256": adapter_sha, "base_sha256": base_sha,
                "scope": params.scope,
                "eval_rows": metrics["rows"], "eval_rows_sha256": metrics["eval_rows_sha256"],
                "metrics": {k: metrics["tuned"].get(k) for k in params.metrics},
                "base_metrics": {k: metrics["base"].get(k) for k in params.metrics},
                "champion": ({"adapter_sha256": promoted["adapter_sha256"],
                              "metrics": {k: aggregate(champion_evals)[k] for k in params.metrics}}
                             if champion is not None else None),
                "comparisons": comparisons, "golden": golden,
                "families": family_slices(evals, champion_evals, params),
                "families_vs": "champion" if champion is not None else "base",
                "data_since_champion": ({k: changes[k] for k in ("added", "removed", "families_appeared", "families_vanished")}
                                        if changes else None),
                # no timestamp: the same inputs give the same bytes (DVC and git history say when)
                "previous": {k: promoted.get(k) for k in ("adapter_sha256", "metrics", "eval_rows_sha256", "scope")} if promoted else None}
    decision["compared_against"] = compared_against(decision, promoted)
    if ok:
        with atomic_path(layout.PROMOTED_DIR, is_dir=True) as tmp:
            shutil.copytree(layout.ADAPTER_DIR, tmp / "adapter")
            shutil.copy(layout.METRICS, tmp / "metrics.json")
            write_json(tmp / "promotion.json", decision)
            write_handoff(tmp, decision)
            manifest.to_parquet(tmp / TRAIN_MANIFEST, index=False)  # what the next retrain's data report compares with
    elif not layout.PROMOTED_DIR.exists():
        layout.PROMOTED_DIR.mkdir(parents=True)  # an empty registry: nothing promoted yet
    write_json(layout.PROMOTION_JSON, decision)
    write_text(layout.PROMOTION_MD, report(decision))
    (log.info if ok else log.warning)("adapter %s: %s", "PROMOTED" if ok else "NOT promoted", "; ".join(reasons))
    return {"promoted": ok, "reasons": reasons}


if __name__ == "__main__":
    main("promote", run)
