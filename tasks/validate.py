"""validate stage: a pandera schema over the ingested table; failing rows go to the rejects file.

    python -m tasks.validate    (or: dvc repro validate)

Validation is lazy, so every failure of every row is collected; a row that fails any check is
rejected with all of its reasons. Rows read = accepted + rejected, per source, on every run; the
stage stops when the rejected fraction is over validate.max_reject_fraction.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict

import pandas as pd
import pandera.pandas as pa

from loraflow import layout
from loraflow.artifacts import write_json, write_jsonl, write_parquet, write_text
from loraflow.errors import LoraflowError
from loraflow.params import ValidateParams
from loraflow.stage import main

log = logging.getLogger("loraflow.validate")

ROLES = {"system", "user", "assistant"}
DUPLICATE = "duplicate id"


def parse_turns(cell) -> list | None:
    """The conversation of one row, parsed once for every check (None: unreadable row)."""
    try:
        turns = json.loads(cell)
    except (TypeError, ValueError):
        return None
    return turns if isinstance(turns, list) else None


def _is_conversation(turns: list) -> bool:
    return bool(turns) and all(isinstance(t, dict) and set(t) >= {"role", "content"} for t in turns)


def _roles_known(turns: list) -> bool:
    return all(isinstance(t, dict) and t.get("role") in ROLES for t in turns)


def _contents_are_text(turns: list) -> bool:
    return all(isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"].strip() for t in turns)


def _role_order(turns: list) -> bool:
    """Optional system turn first, then user and assistant alternating from a user turn."""
    roles = [t.get("role") for t in turns if isinstance(t, dict)]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    return all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


def _ends_with_assistant(turns: list) -> bool:
    return bool(turns) and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant"


def _within_length(max_chars: int):
    def check(turns: list) -> bool:
        return all(len(str(t.get("content", ""))) <= max_chars for t in turns if isinstance(t, dict))
    return check


def schema(params: ValidateParams) -> pa.DataFrameSchema:
    def elementwise(fn, error: str) -> pa.Check:
        return pa.Check(fn, element_wise=True, error=error, name=error)

    message_checks = [
        elementwise(_is_conversation, "not a non-empty list of {role, content} turns"),
        elementwise(_roles_known, "unknown role (allowed: system, user, assistant)"),
        elementwise(_contents_are_text, "empty or non-text content in a turn"),
        elementwise(_role_order, "role order broken (want: [system], user, assistant, user, ...)"),
        elementwise(_ends_with_assistant, "does not end with an assistant turn (nothing to train on)"),
        elementwise(_within_length(params.max_chars), f"a turn is longer than validate.max_chars={params.max_chars}"),
    ]
    return pa.DataFrameSchema(
        {
            "id": pa.Column(str, unique=True, report_duplicates="exclude_first"),
            "content_hash": pa.Column(str, unique=params.drop_duplicates, report_duplicates="exclude_first"),
            "near_key": pa.Column(str, unique=params.drop_near_duplicates, report_duplicates="exclude_first"),
            "messages": pa.Column(str, nullable=True),
            # unreadable rows (no turns) skip these checks: their ingest_error is their reason
            "turns": pa.Column(object, checks=message_checks, nullable=True),
            "ingest_error": pa.Column(str, pa.Check(lambda s: s.isna(), error="unreadable row", name="unreadable row"),
                                      nullable=True),
            "source": pa.Column(str), "line": pa.Column(int),
        },
        strict=False, coerce=False,
    )


def reasons_by_row(df: pd.DataFrame, params: ValidateParams) -> dict[int, list[str]]:
    """Every failed check of every row, by row index."""
    # An exact repeat is judged as one (drop_duplicates), not again as a near duplicate.
    df = df.assign(near_key=df["near_key"].where(~df["content_hash"].duplicated(), df["id"]),
                   turns=df["messages"].map(parse_turns))
    try:
        schema(params).validate(df, lazy=True)
        return {}
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
    reasons: dict[int, list[str]] = defaultdict(list)
    dup_reason = {"id": DUPLICATE + ": same id as", "content_hash": "exact duplicate of",
                  "near_key": "near duplicate of"}
    for case in cases.itertuples(index=False):
        if case.index is None or pd.isna(case.index):
            raise LoraflowError(f"validation failed for the whole table: {case.column}: {case.check}")
        idx = int(case.index)
        if case.column == "ingest_error":
            reason = str(df.at[idx, "ingest_error"])
        elif case.check == "field_uniqueness":
            first = df.loc[df[case.column] == df.at[idx, case.column]].iloc[0]
            reason = f"{dup_reason[case.column]} {first['source']}:{first['line']}"
        else:
            reason = f"messages: {case.check}" if case.column == "turns" else f"{case.column}: {case.check}"
        if reason not in reasons[idx]:
            reasons[idx].append(reason)
    return dict(reasons)


def markdown_report(report: dict) -> str:
    lines = ["# Validation report", "",
             f"Read {report['read']} rows: **{report['accepted']} accepted, {report['rejected']} rejected** "
             f"({report['rejected_fraction']:.2%}; limit {report['max_reject_fraction']:.2%}).", "",
             "| source | read | accepted | rejected |", "|---|---|---|---|"]
    for src, c in report["per_source"].items():
        lines.append(f"| {src} | {c['read']} | {c['accepted']} | {c['rejected']} |")
    lines += ["", "## Rejections by reason", "", "| reason | rows | examples (source:line) |", "|---|---|---|"]
    for reason, c in report["per_reason"].items():
        lines.append(f"| {reason} | {c['rows']} | {', '.join(c['examples'])} |")
    return "\n".join(lines) + "\n"


def run(params: ValidateParams) -> dict:
    df = pd.read_parquet(layout.INGESTED)
    reasons = reasons_by_row(df, params)
    rejected_mask = df.index.isin(list(reasons))
    accepted, rejected = df[~rejected_mask], df[rejected_mask]

    per_source = {}
    for src, group in df.groupby("source", sort=False):
        n_rej = int(group.index.isin(list(reasons)).sum())
        per_source[src] = {"read": len(group), "accepted": len(group) - n_rej, "rejected": n_rej}
    reason_counts: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    rejects = []
    for idx, row in rejected.iterrows():
        for r in reasons[idx]:
            key = next((k for k in (DUPLICATE, "exact duplicate", "near duplicate") if r.startswith(k)), r)
            reason_counts[key] += 1
            if len(examples[key]) < 3:
                examples[key].append(f"{row['source']}:{row['line']}")
        rejects.append({"id": row["id"], "source": row["source"], "line": int(row["line"]),
                        "reasons": reasons[idx], "messages": row["messages"]})
    fraction = len(rejected) / max(len(df), 1)
    report = {"read": len(df), "accepted": len(accepted), "rejected": len(rejected),
              "rejected_fraction": round(fraction, 6), "max_reject_fraction": params.max_reject_fraction,
              "per_source": per_source,
              "per_reason": {r: {"rows": n, "examples": examples[r]} for r, n in reason_counts.most_common()}}
    assert report["read"] == report["accepted"] + report["rejected"]
    write_jsonl(layout.REJECTS, rejects)
    write_json(layout.VALIDATION_JSON, report)
    write_text(layout.VALIDATION_MD, markdown_report(report))
    if fraction > params.max_reject_fraction:
        raise LoraflowError(
            f"{len(rejected)} of {len(df)} rows rejected ({fraction:.1%}), over validate.max_reject_fraction="
            f"{params.max_reject_fraction}. See {layout.REJECTS} and {layout.VALIDATION_MD}; fix the data or raise the limit.")
    write_parquet(layout.VALIDATED, accepted.drop(columns=["ingest_error"]).reset_index(drop=True))
    for r, c in report["per_reason"].items():
        log.warning("rejected %d row%s: %s (e.g. %s)", c["rows"], "" if c["rows"] == 1 else "s", r, ", ".join(c["examples"]))
    return {k: report[k] for k in ("read", "accepted", "rejected", "rejected_fraction")}


if __name__ == "__main__":
    main("validate", run)
