"""Retraining over three rounds, against real DVC and a real Prefect server, as a team runs it:

1. `dvc repro` trains on the first data and promotes (nothing was promoted before);
2. new raw data arrives; the Prefect flow retrains from the champion (train.init_from: promoted), and
   the gate scores the champion and the challenger on the same new eval rows;
3. a deliberately worse adapter (a fresh one, a few steps) is refused, with its interval in the report.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import BIN, dvc_status, edit_params, make_workspace, read_json, run_flow, sh

pytestmark = pytest.mark.slow


def promoted_adapter_sha(ws) -> str:
    return read_json(ws, "models/promoted/promotion.json")["adapter_sha256"]


def test_three_rounds_of_retraining_are_gated_on_the_same_rows(tmp_path, prefect_server):
    ws = make_workspace(tmp_path / "ws")
    raw = (ws / "data/raw/alpaca.jsonl").read_text().splitlines(keepends=True)
    first_rows = len(raw) * 3 // 4  # round 1's data; the last quarter arrives in round 2
    (ws / "data/raw/alpaca.jsonl").write_text("".join(raw[:first_rows]))
    # a golden set from rows that arrive later as training data too: they must never be trained on
    (ws / "data/raw/golden.jsonl").write_text("".join(raw[-40:]))
    # the golden rows arrive as training data in round 2, where validation rejects each as a duplicate
    # of its golden row: 40 of about 750 rows, more than the default 5% limit with the demo's own rejects
    edit_params(ws, ingest={"golden_sources": ["data/raw/golden.jsonl"]}, train={"init_from": "promoted"},
                evaluate={"max_rows": 120}, validate={"max_reject_fraction": 0.1})

    # round 1: nothing promoted yet, so a fresh adapter; it must beat the base beyond the noise
    sh([str(BIN / "dvc"), "repro"], ws)
    first = read_json(ws, "reports/promotion.json")
    assert first["promoted"] and first["champion"] is None
    assert any("no adapter promoted before" in r for r in first["reasons"])
    assert first["comparisons"]["exact_match"]["base"]["low"] >= 0.05
    assert read_json(ws, "reports/stages/train.json")["init_from"] is None
    assert read_json(ws, "reports/data_changes.json")["changes"] is None  # no champion to compare with
    golden_rows = len(pd.read_parquet(ws / "data/processed/golden.parquet"))
    assert golden_rows >= 35 and read_json(ws, "reports/metrics.json")["golden"]["rows"] == golden_rows
    assert first["golden"]["rows"] == golden_rows and "base" in first["golden"]["comparisons"]["rougeL"]
    round1_loss = pd.read_csv(ws / "reports/train_loss.csv")["loss"]
    champion_sha = promoted_adapter_sha(ws)
    # the handoff: a model card, the template, and a generation config that stops where training taught
    chat = read_json(ws, "data/interim/chat_format.json")
    for model in ("models/promoted", "models/merged"):
        assert read_json(ws, f"{model}/generation_config.json")["eos_token_id"] == chat["stop_ids"]
        card = (ws / model / "README.md").read_text()
        assert f"`{chat['end_of_turn']}`".replace("|", "\\|") in card and read_json(ws, "models/adapter/train_info.json")["train_tokens_sha256"] in card
    card = (ws / "models/promoted/README.md").read_text()
    assert "| exact_match |" in card and "interval" in card and "| pass |" in card
    assert "## Merge check" in (ws / "models/merged/README.md").read_text()

    # round 2: more rows arrive; the flow (on the Prefect server) warm-starts from the champion
    (ws / "data/raw/more.jsonl").write_text("".join(raw[first_rows:]))
    edit_params(ws, ingest={"sources": ["data/raw/alpaca.jsonl", "data/raw/chat.jsonl", "data/raw/more.jsonl"]})
    lines = run_flow(ws, prefect_server)
    assert lines["train"].startswith("ran in") and lines["promote"].startswith("ran in")
    train = read_json(ws, "reports/stages/train.json")
    assert train["init_from"]["sha256"] == champion_sha
    round2_loss = pd.read_csv(ws / "reports/train_loss.csv")["loss"]
    # it starts where the champion ended, not where a fresh adapter on the base starts
    assert round2_loss.iloc[0] < round1_loss.iloc[0] / 2
    assert round2_loss.iloc[0] < round1_loss.iloc[len(round1_loss) // 2]
    lineage = read_json(ws, "reports/lineage.json")
    assert lineage["warm_start"]["sha256"] == champion_sha
    second = read_json(ws, "reports/promotion.json")
    metrics = read_json(ws, "reports/metrics.json")
    assert second["eval_rows_sha256"] == metrics["eval_rows_sha256"] != first["eval_rows_sha256"]
    assert second["champion"]["adapter_sha256"] == champion_sha
    # the golden rows arrived in more.jsonl too: still scored, never trained on
    golden = pd.read_parquet(ws / "data/processed/golden.parquet")
    train_rows = pd.read_parquet(ws / "data/processed/train.parquet")
    assert len(golden) == golden_rows and not set(golden["prompt"]) & set(train_rows["prompt"])
    assert second["golden"]["rows_sha256"] == first["golden"]["rows_sha256"]  # the same frozen rows, both rounds
    assert second["golden"]["comparisons"]["exact_match"]["champion"]["rows"] > 0
    # what the person reading the decision sees about the data: the new rows, none lost
    changes = read_json(ws, "reports/data_changes.json")["changes"]
    arrived = int((train_rows["source"] == "data/raw/more.jsonl").sum())  # round 2's new rows in the train split
    assert changes["rows"] == len(train_rows) and changes["added"] == len(train_rows) - changes["champion_rows"] == arrived > 0
    assert changes["removed"] == 0 and second["data_since_champion"]["added"] == changes["added"]
    assert f"**{changes['added']} added, 0 removed**" in (ws / "reports/data_changes.md").read_text()
    for key in ("exact_match", "rougeL"):
        vs = second["comparisons"][key]["champion"]
        assert vs["low"] <= vs["difference"] <= vs["high"] and vs["rows"] > 0
        assert vs["a"] == pytest.approx(metrics["tuned"][key], abs=1e-4)  # the challenger's score on these rows
    assert "| family | metric | base | champion | challenger |" in (ws / "reports/promotion.md").read_text()
    assert not dvc_status(ws)
    champion_sha = promoted_adapter_sha(ws)  # round 2's adapter, if it won; else still round 1's

    # round 3: a far weaker adapter; the gate refuses it and shows the interval that says so
    edit_params(ws, train={"init_from": "base", "max_steps": 5})
    sh([str(BIN / "dvc"), "repro"], ws)
    third = read_json(ws, "reports/promotion.json")
    assert not third["promoted"] and promoted_adapter_sha(ws) == champion_sha
    vs = third["comparisons"]["exact_match"]["champion"]
    assert vs["verdict"] == "FAIL" and vs["high"] < 0
    report = (ws / "reports/promotion.md").read_text()
    assert "NOT promoted" in report and "exact_match: challenger vs champion" in report and "95% interval" in report
    print("round 1:", json.dumps(first["comparisons"]["exact_match"]),
          "\nround 2:", json.dumps(second["comparisons"]), second["promoted"],
          "\nround 3:", json.dumps(third["comparisons"]["exact_match"]))
