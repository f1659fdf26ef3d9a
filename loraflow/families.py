"""The per-family (per-task) score table, shared by the generation audit and the flow's Prefect
artifact. Light on purpose: the flow imports it without torch."""
from __future__ import annotations


def family_table(families: dict) -> list[str]:
    """Markdown rows of reports/metrics.json's `by_family`: rows, then base and tuned side by side."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    lines = ["| family | rows | exact match base | tuned | ROUGE-L base | tuned |", "|---|---|---|---|---|---|"]
    for family, f in families.items():
        lines.append(f"| {family} | {f['rows']} | {fmt(f['base']['exact_match'])} | {fmt(f['tuned']['exact_match'])} "
                     f"| {fmt(f['base']['rougeL'])} | {fmt(f['tuned']['rougeL'])} |")
    return lines
