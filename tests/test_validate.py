"""validate: every failing row rejected with its reasons; read = accepted + rejected."""
import json

import pandas as pd
import pytest

from loraflow import layout
from loraflow.errors import LoraflowError
from loraflow.params import ValidateParams
from tasks import validate
from tasks.ingest import ingest

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
CASES = {
    "empty or non-text content": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    "unknown role": {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
    "role order broken": {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"},
                                       {"role": "assistant", "content": "y"}]},
    "does not end with an assistant turn": {"messages": [{"role": "user", "content": "Hi"}]},
    "missing field(s): output": {"instruction": "x"},
}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_on(rows, params=ValidateParams()):
    path = "raw.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    df = ingest([path])
    layout.INGESTED.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(layout.INGESTED)
    return validate.run(params)


def test_each_bad_row_rejected_with_its_reason(in_tmp):
    rows = [GOOD] + list(CASES.values()) + [GOOD, '{"broken', GOOD | {"messages": GOOD["messages"] * 2}]
    summary = run_on(rows, ValidateParams(max_reject_fraction=1.0))
    rejects = [json.loads(l) for l in open(layout.REJECTS)]
    by_line = {r["line"]: " ".join(r["reasons"]) for r in rejects}
    for line, reason in enumerate(CASES, start=2):
        assert reason in by_line[line], (line, by_line)
    assert "exact duplicate of raw.jsonl:1" in by_line[7]
    assert "malformed JSON" in by_line[8]
    assert 9 not in by_line and 1 not in by_line
    assert summary["read"] == summary["accepted"] + summary["rejected"] == 9
    report = json.loads(layout.VALIDATION_JSON.read_text())
    assert report["per_source"]["raw.jsonl"] == {"read": 9, "accepted": 2, "rejected": 7}
    assert len(pd.read_parquet(layout.VALIDATED)) == 2


def test_reject_fraction_over_limit_stops_with_pointer_to_rejects(in_tmp):
    with pytest.raises(LoraflowError, match=r"rejects\.jsonl"):
        run_on([GOOD, CASES["unknown role"]], ValidateParams(max_reject_fraction=0.1))
    assert layout.REJECTS.exists() and not layout.VALIDATED.exists()


def test_duplicates_kept_when_asked(in_tmp):
    summary = run_on([GOOD, GOOD], ValidateParams(drop_duplicates=False))
    assert summary["accepted"] == 2
