"""What changed in the training data since the champion was trained: rows added and removed (by
their content-hash ids), families (tasks) that appeared or vanished, and the shift of the token
length distribution. The gate writes it beside its decision, so whoever reads why a model changed
sees what it was trained on.

A promoted adapter keeps a manifest of its training rows (id, family, length) in the registry; a
retrain compares its own rows with it.
"""
from __future__ import annotations

import pandas as pd

MANIFEST_COLUMNS = ["id", "family", "length"]
QUANTILES = (0.1, 0.5, 0.9)


def manifest(train_rows: pd.DataFrame) -> pd.DataFrame:
    """The part of a training set the comparison needs: no text, a few bytes a row."""
    return train_rows[MANIFEST_COLUMNS].sort_values("id").reset_index(drop=True)


def lengths(rows: pd.DataFrame) -> dict:
    q = rows["length"].quantile(list(QUANTILES))
    return {"mean": round(float(rows["length"].mean()), 1), **{f"p{int(k * 100)}": float(v) for k, v in q.items()}}


def compare(champion: pd.DataFrame, current: pd.DataFrame) -> dict:
    """Rows and families added and removed, and the length distribution before and after."""
    before, after = set(champion["id"]), set(current["id"])
    fam_before, fam_after = champion["family"].value_counts(), current["family"].value_counts()
    families = sorted(set(fam_before.index) | set(fam_after.index))
    return {"champion_rows": len(champion), "rows": len(current), "added": len(after - before),
            "removed": len(before - after), "kept": len(after & before),
            "families_appeared": sorted(set(fam_after.index) - set(fam_before.index)),
            "families_vanished": sorted(set(fam_before.index) - set(fam_after.index)),
            "family_rows": {f: {"champion": int(fam_before.get(f, 0)), "now": int(fam_after.get(f, 0))} for f in families},
            "length_tokens": {"champion": lengths(champion), "now": lengths(current)}}


def markdown(changes: dict | None, why_none: str = "") -> str:
    lines = ["# Training data since the champion", ""]
    if changes is None:
        return "\n".join(lines + [why_none or "No champion: nothing to compare with.", ""])
    c = changes
    lines += [f"{c['rows']} training rows now, {c['champion_rows']} when the champion was trained: "
              f"**{c['added']} added, {c['removed']} removed**, {c['kept']} in both.", ""]
    if c["families_appeared"]:
        lines.append(f"- Families that appeared: {', '.join(c['families_appeared'])}")
    if c["families_vanished"]:
        lines.append(f"- Families that vanished: {', '.join(c['families_vanished'])}")
    lengths_before, lengths_now = c["length_tokens"]["champion"], c["length_tokens"]["now"]
    lines += ["", "| row length (tokens) | champion | now |", "|---|---|---|"]
    lines += [f"| {k} | {lengths_before[k]} | {lengths_now[k]} |" for k in lengths_before]
    lines += ["", "| family | champion rows | rows now |", "|---|---|---|"]
    lines += [f"| {f} | {n['champion']} | {n['now']} |" for f, n in c["family_rows"].items()]
    return "\n".join(lines) + "\n"
