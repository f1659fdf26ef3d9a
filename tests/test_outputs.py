"""What every output file promises: strict JSON, cells a spreadsheet will not run, and the same file
mode for weights as for any other output."""
import json
import os

from loraflow.artifacts import atomic_path, spreadsheet_safe, write_json, write_jsonl


def test_json_outputs_have_no_bare_nan(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"line": float("nan"), "x": [float("inf"), 1.5]}])
    write_json(tmp_path / "m.json", {"a": float("nan")})
    strict = lambda text: json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert strict((tmp_path / "r.jsonl").read_text()) == {"line": None, "x": [None, 1.5]}
    assert strict((tmp_path / "m.json").read_text()) == {"a": None}


def test_cells_that_start_a_formula_are_quoted():
    assert [spreadsheet_safe(v) for v in ["=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "ok", 3]] == \
        ["'=HYPERLINK(\"x\")", "'+1", "'-2", "'@SUM(A1)", "ok", 3]


def test_outputs_get_the_usual_mode_even_when_the_writer_makes_0600(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model", is_dir=True) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"x")
            (tmp / "weights.safetensors").chmod(0o600)
        with atomic_path(tmp_path / "single.bin") as tmp:
            tmp.write_bytes(b"y")
            tmp.chmod(0o600)
    finally:
        os.umask(old)
    assert oct((tmp_path / "model/weights.safetensors").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "single.bin").stat().st_mode & 0o777) == "0o644"
