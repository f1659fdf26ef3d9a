"""promote stage: the promotion gate. The new adapter is promoted only if it beats the base model
and the last promoted adapter, on every gated metric, by the margins in params.promote.

    python -m tasks.promote     (or: dvc repro promote)

models/promoted/ holds the promoted adapter with its metrics and the decision that promoted it; it
persists across runs (DVC versions each state). reports/promotion.{json,md} record every decision,
promoted or not, with its reasons.
"""
from __future__ import annotations

import json
import logging
import shutil

from loraflow import layout
from loraflow.artifacts import atomic_path, sha256_tree, write_json, write_text
from loraflow.params import PromoteParams
from loraflow.stage import main

log = logging.getLogger("loraflow.promote")


def decide(metrics: dict, promoted: dict | None, params: PromoteParams) -> tuple[bool, list[str]]:
    """(promote?, reasons): one reason per gated comparison, passed or not."""
    reasons, ok = [], True
    for key in params.metrics:
        new, base = metrics["tuned"].get(key), metrics["base"].get(key)
        if new is None or base is None:
            ok = False
            reasons.append(f"{key}: not measured on this run")
            continue
        passed = new >= base + params.min_gain_over_base
        ok &= passed
        reasons.append(f"{key}: tuned {new:.4f} vs base {base:.4f} (needs +{params.min_gain_over_base}): "
                       f"{'pass' if passed else 'FAIL'}")
        if promoted is not None and promoted["metrics"].get(key) is not None:
            last = promoted["metrics"][key]
            passed = new >= last + params.min_gain_over_promoted
            ok &= passed
            reasons.append(f"{key}: tuned {new:.4f} vs last promoted {last:.4f} (needs +{params.min_gain_over_promoted}): "
                           f"{'pass' if passed else 'FAIL'}")
    if promoted is None:
        reasons.append("no adapter promoted before: compared with the base only")
    return ok, reasons


def run(params: PromoteParams) -> dict:
    metrics = json.loads(layout.METRICS.read_text())
    record_file = layout.PROMOTED_DIR / "promotion.json"
    promoted = json.loads(record_file.read_text()) if record_file.exists() else None
    ok, reasons = decide(metrics, promoted, params)
    adapter_sha = sha256_tree(layout.ADAPTER_DIR)
    if promoted is not None and promoted["adapter_sha256"] == adapter_sha:
        ok, reasons = False, ["this adapter is already the promoted one"] + reasons
    decision = {"promoted": ok, "reasons": reasons, "adapter_sha256": adapter_sha,
                "metrics": {k: metrics["tuned"].get(k) for k in params.metrics},
                "base_metrics": {k: metrics["base"].get(k) for k in params.metrics},
                # no timestamp: the same inputs give the same bytes (DVC and git history say when)
                "previous": {k: promoted[k] for k in ("adapter_sha256", "metrics")} if promoted else None}
    if ok:
        with atomic_path(layout.PROMOTED_DIR, is_dir=True) as tmp:
            shutil.copytree(layout.ADAPTER_DIR, tmp / "adapter")
            shutil.copy(layout.METRICS, tmp / "metrics.json")
            write_json(tmp / "promotion.json", decision)
    elif not layout.PROMOTED_DIR.exists():
        layout.PROMOTED_DIR.mkdir(parents=True)  # an empty registry: nothing promoted yet
    write_json(layout.PROMOTION_JSON, decision)
    verdict = "PROMOTED" if ok else "NOT promoted"
    write_text(layout.PROMOTION_MD, f"# Promotion gate: {verdict}\n\n" + "\n".join(f"- {r}" for r in reasons) + "\n")
    (log.info if ok else log.warning)("adapter %s: %s", verdict, "; ".join(reasons))
    return {"promoted": ok, "reasons": reasons}


if __name__ == "__main__":
    main("promote", run)
