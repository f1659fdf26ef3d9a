"""The catalogue of bad inputs: each case ends either in a clear error naming the file and what to
do, or in the rejects file with its reason. Rows read = accepted + rejected, per file, every time."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from loraflow import layout
from loraflow.errors import LoraflowError
from loraflow.params import ValidateParams
from tasks import validate
from tasks.ingest import ingest

U = {"role": "user", "content": "What is the capital of Peru?"}
A = {"role": "assistant", "content": "Lima"}
GOOD = {"messages": [U, A]}


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}"}]}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_lines(name: str, lines: list) -> str:
    with open(name, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return name


def validate_files(*sources: str) -> tuple[dict, dict[tuple[str, int], str]]:
    """Run ingest + validate; returns the validation report and {(source, line): reasons}."""
    df = ingest(list(sources))
    layout.INGESTED.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(layout.INGESTED)
    validate.run(ValidateParams(max_reject_fraction=1.0))
    rejects = [json.loads(l) for l in open(layout.REJECTS)]
    report = json.loads(layout.VALIDATION_JSON.read_text())
    for src, counts in report["per_source"].items():
        assert counts["read"] == counts["accepted"] + counts["rejected"], src
    return report, {(r["source"], r["line"]): " | ".join(r["reasons"]) for r in rejects}


ROW_CASES = [
    ("malformed JSON line", b'{"messages": [\n', "malformed JSON"),
    ("content of the wrong type", {"messages": [U, {"role": "assistant", "content": 5}]}, "non-text content"),
    ("alpaca field of the wrong type", {"instruction": "x", "output": 7}, "must be strings"),
    ("a missing field", {"instruction": "x", "input": ""}, "missing field(s): output"),
    ("empty content", {"messages": [U, {"role": "assistant", "content": ""}]}, "empty or non-text content"),
    ("whitespace-only content", {"messages": [U, {"role": "assistant", "content": " \t\n"}]}, "empty or non-text content"),
    ("bytes that are not UTF-8", b'{"messages": "\xff\xfe"}\n', "not UTF-8"),
    ("NUL bytes", b'{"messages": [{"role": "user", "content": "a\\u0000b"}, {"role": "assistant", "content": "x"}]}\n',
     "NUL"),
    ("a single huge row", {"messages": [U, {"role": "assistant", "content": "x" * 50_000}]}, "longer than validate.max_chars"),
    ("an unknown role", {"messages": [U, {"role": "bot", "content": "Lima"}]}, "unknown role"),
    ("two user turns in a row", {"messages": [U, U, A]}, "role order broken"),
    ("assistant first", {"messages": [A, U, A]}, "role order broken"),
    ("no assistant turn", {"messages": [U]}, "does not end with an assistant turn"),
    ("not a list of turns", {"messages": {"role": "user"}}, "must be a list of turns"),
    ("no recognised fields", {"question": "x", "answer": "y"}, "no recognised fields"),
    ("a lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n',
     "lone UTF-16 surrogate"),
    ("JSON nested 100,000 deep", b"[" * 100_000 + b"\n", "nested too deeply"),
]


@pytest.mark.parametrize("case, line, reason", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_goes_to_rejects_with_its_reason(in_tmp, case, line, reason):
    src = write_lines("raw.jsonl", [good(1), line, good(2)])
    report, rejects = validate_files(src)
    assert reason in rejects[(src, 2)], rejects
    assert report["accepted"] == 2 and report["rejected"] == 1


def test_bom_and_crlf_are_read_as_text(in_tmp):
    src = write_lines("raw.jsonl", [b"\xef\xbb\xbf" + json.dumps(good(1)).encode() + b"\r\n",
                                    json.dumps(good(2)).encode() + b"\r\n"])
    report, rejects = validate_files(src)
    assert report["accepted"] == 2 and not rejects


def test_mixed_formats_in_one_file(in_tmp):
    src = write_lines("raw.jsonl", [good(1), {"instruction": "Add two and two.", "output": "four"},
                                    {"prompt": "Say hi.", "completion": "hi"}])
    report, rejects = validate_files(src)
    assert report["accepted"] == 3
    assert sorted(pd.read_parquet(layout.VALIDATED)["format"]) == ["alpaca", "chat", "prompt_completion"]


def test_duplicate_ids_and_duplicate_rows(in_tmp):
    src = write_lines("raw.jsonl", [
        {"id": "a", **good(1)}, {"id": "a", **good(2)},        # same id, other content
        {"id": "b", **good(3)}, {"id": "c", **good(3)},        # other ids, same content
        good(4), good(4),                                       # exact duplicate rows
    ])
    report, rejects = validate_files(src)
    assert "duplicate id: same id as raw.jsonl:1" in rejects[(src, 2)]
    assert "exact duplicate of raw.jsonl:3" in rejects[(src, 4)]
    assert "exact duplicate of raw.jsonl:5" in rejects[(src, 6)]
    assert report["accepted"] == 3


def test_near_duplicates_after_case_and_whitespace(in_tmp):
    near = {"messages": [{"role": "user", "content": "what is  the capital of\nPERU?"}, {"role": "assistant", "content": "lima"}]}
    src = write_lines("raw.jsonl", [GOOD, near, good(1)])
    report, rejects = validate_files(src)
    assert "near duplicate of raw.jsonl:1" in rejects[(src, 2)]
    assert report["accepted"] == 2


def test_near_duplicates_kept_when_asked(in_tmp):
    near = {"messages": [{"role": "user", "content": "WHAT is the capital of Peru?"}, A]}
    src = write_lines("raw.jsonl", [GOOD, near])
    df = ingest([src])
    layout.INGESTED.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(layout.INGESTED)
    assert validate.run(ValidateParams(drop_near_duplicates=False))["accepted"] == 2


def test_per_file_counts_reconcile_across_files(in_tmp):
    a = write_lines("a.jsonl", [good(1), b"{broken\n", good(2)])
    b = write_lines("b.jsonl", [good(3), {"messages": [U]}])
    report, _ = validate_files(a, b)
    assert report["per_source"] == {"a.jsonl": {"read": 3, "accepted": 2, "rejected": 1},
                                    "b.jsonl": {"read": 2, "accepted": 1, "rejected": 1}}


def test_parquet_with_the_wrong_schema_is_a_file_error(in_tmp):
    pd.DataFrame({"question": ["x"], "answer": ["y"]}).to_parquet("bad.parquet")
    with pytest.raises(LoraflowError, match=r"bad\.parquet: columns \['answer', 'question'\] match no supported form"):
        ingest(["bad.parquet"])


def test_empty_file_missing_path_and_empty_directory(in_tmp):
    open("empty.jsonl", "w").close()
    (in_tmp / "nodata").mkdir()
    for src, message in (("empty.jsonl", "no rows found"), ("missing.jsonl", "does not exist"),
                         ("nodata", "not a saved `datasets` directory")):
        with pytest.raises(LoraflowError, match=message):
            ingest([src])


def test_input_problem_shows_no_traceback(in_tmp):
    (in_tmp / "params.yaml").write_text("ingest:\n  sources: [missing.jsonl]\n")
    proc = subprocess.run([sys.executable, "-m", "tasks.ingest"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "loraflow ingest: error: ingest.sources: missing.jsonl does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


HOSTILE_FILES = [
    ("a truncated JSON array", "rows.json", b'[{"instruction": "a", "output": "b"}, {"instruc', "not valid JSON at line 1"),
    ("a CSV row of the wrong width", "rows.csv", b"instruction,input,output\na,,b\nc,d,e,f,g\n", "not a well-formed CSV"),
    ("a Latin-1 CSV", "rows.csv", "instruction,input,output\ncaf\u00e9,,b\n".encode("latin-1"), "not UTF-8"),
    ("a corrupt Parquet file", "rows.parquet", b"PAR1" + b"\x00garbage" * 20, "could not be read"),
    ("a corrupt gzip file", "rows.jsonl.gz", b"\x1f\x8b\x08garbage", "could not be read"),
]


@pytest.mark.parametrize("case, name, data, reason", HOSTILE_FILES, ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_file_is_one_clear_error_naming_it(in_tmp, case, name, data, reason):
    (in_tmp / name).write_bytes(data)
    with pytest.raises(LoraflowError, match=reason) as e:
        ingest([name])
    assert name in str(e.value)


def test_a_source_dvc_does_not_track_is_refused(in_tmp):
    """A source outside the ingest stage's deps would not rerun the pipeline when it changes."""
    from tasks.ingest import check_sources_are_dependencies
    (in_tmp / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: x\n    deps: [tasks/ingest.py, data/raw]\n")
    (in_tmp / "data/raw").mkdir(parents=True)
    check_sources_are_dependencies(["data/raw/a.jsonl", "data/raw/sub/b.csv"])
    with pytest.raises(LoraflowError, match="elsewhere.jsonl is not under the ingest stage's dependencies"):
        check_sources_are_dependencies(["data/raw/a.jsonl", str(in_tmp / "elsewhere.jsonl")])


def test_a_secret_in_a_row_is_masked_everywhere_and_the_row_rejected(in_tmp):
    token = "hf_" + "A1b2C3d4" * 4
    leaky = {"id": f"row-{token}", "messages": [{"role": "user", "content": f"my key is {token}"}, A]}
    src = write_lines("raw.jsonl", [good(1), leaky, good(2)])
    report, rejects = validate_files(src)
    assert "token-shaped secret" in rejects[(src, 2)] and report["rejected"] == 1
    for path in [layout.INGESTED, layout.REJECTS, layout.VALIDATED, layout.VALIDATION_JSON]:
        data = path.read_bytes()
        assert token.encode() not in data, path
