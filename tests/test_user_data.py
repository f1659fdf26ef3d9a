"""A user's own data, as a new user brings it: a support-ticket CSV with its own column names, run end
to end with nothing but params.yaml changes (ingest.sources' column mapping, promote.scope)."""
from __future__ import annotations

import csv
import json
import random

import pytest

from conftest import BIN, edit_params, make_tiny, make_workspace, read_json, sh

pytestmark = pytest.mark.slow

TASKS = {
    "account": [("How do I reset my password?", "Use the reset link on the sign-in page."),
                ("How do I change my email?", "Open Settings, then Account, and edit the email.")],
    "billing": [("When is my card charged?", "On the first day of each month."),
                ("Can I get a refund?", "Yes, within 30 days of the charge.")],
    "shipping": [("Where is my parcel?", "Track it with the number in your confirmation email."),
                 ("Do you ship abroad?", "Yes, to most countries in Europe.")],
}


def write_tickets(path) -> dict:
    """About 150 tickets in three tasks, one answer spanning lines (quoted), one ticket with no answer
    after it: that reject must name the line an editor shows. Returns that line and the row count."""
    rng = random.Random(7)
    rows = []
    for i in range(150):
        task = rng.choice(sorted(TASKS))
        question, answer = rng.choice(TASKS[task])
        rows.append({"ticket_id": f"T-{i:04d}", "question": f"{question} (order {rng.randint(100, 999)})",
                     "answer": answer, "task": task})
    rows[20]["answer"] = "Use the reset link.\nIf it does not arrive,\ncheck the spam folder."
    rows[21]["answer"] = ""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["ticket_id", "question", "answer", "task"])
        writer.writeheader()
        writer.writerows(rows)
    # header on line 1, rows 0..19 on lines 2..21, row 20 on lines 22-24, so row 21 on line 25
    return {"empty_answer_line": 25, "rows": len(rows)}


def test_a_user_csv_with_its_own_columns_runs_end_to_end(tmp_path):
    ws = make_workspace(tmp_path)
    made = write_tickets(ws / "data/raw/tickets.csv")
    make_tiny(ws)
    edit_params(ws, ingest={"sources": [{"path": "data/raw/tickets.csv", "columns": {
        "question": "instruction", "answer": "output", "task": "family", "ticket_id": "id"}}]},
        promote={"scope": "tickets"})  # a new task: the demo's promoted adapter is no rival
    sh([str(BIN / "dvc"), "repro"], ws)

    validation = read_json(ws, "reports/validation.json")
    assert validation["read"] == made["rows"]
    rejects = [json.loads(l) for l in (ws / "data/interim/rejects.jsonl").read_text().splitlines()]
    empty = [r for r in rejects if r["id"] == "T-0021"]
    assert empty and empty[0]["line"] == made["empty_answer_line"] and empty[0]["source"] == "data/raw/tickets.csv"
    metrics = read_json(ws, "reports/metrics.json")
    assert set(metrics["by_family"]) <= set(TASKS) and len(metrics["by_family"]) >= 2
    generations = [json.loads(l) for l in (ws / "reports/generations.jsonl").read_text().splitlines()]
    assert all(g["id"].startswith("T-") for g in generations)  # the user's ids, not content hashes
    promotion = read_json(ws, "reports/promotion.json")
    assert promotion["scope"] == "tickets" and promotion["compared_against"] == "Compared against: the base model only."
