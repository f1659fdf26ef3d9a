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


def test_the_loss_curve_artifact_charts_every_point_and_tabulates_evenly_spaced_steps(tmp_path):
    from flows.finetune import SPARK, loss_curve_markdown
    csv = tmp_path / "train_loss.csv"
    csv.write_text("step,loss,lr,eval_loss\n" + "".join(f"{s},{l},0.1,\n" for s, l in
                                                         [(1, 5.9), (5, 5.5), (10, 5.0), (15, 4.7), (20, 4.4)]))
    md = loss_curve_markdown(csv)
    chart = next(line.strip() for line in md.splitlines() if line.strip() and set(line.strip()) <= set(SPARK))
    assert chart == SPARK[-1] + SPARK[5] + SPARK[3] + SPARK[1] + SPARK[0]  # falling, one mark a point
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "step" not in line] == \
        ["1", "5", "10", "15", "20"]
    csv.write_text("step,loss,lr,eval_loss\n" + "".join(f"{s},{10 / s},0.1,\n" for s in range(1, 301)))
    md = loss_curve_markdown(csv, width=60, rows=25)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "step" not in line]
    assert len(rows) == 25 and rows[0].startswith("| 1 |") and rows[-1].startswith("| 300 |")


def test_stage_lines_reach_the_flow_log_at_their_level_without_their_timestamp():
    import logging
    from flows.finetune import stage_log_line
    assert stage_log_line("2026-12-05 03:00:01,123 loraflow.promote WARNING adapter NOT promoted: x") == \
        (logging.WARNING, "loraflow.promote: adapter NOT promoted: x")
    assert stage_log_line("2026-12-05 03:00:01,123 loraflow.train INFO ") is None  # a blank line between tables
    assert stage_log_line("WARNING: 'models/adapter' is empty.")[0] == logging.WARNING
    # an empty rejects file is the clean case: DVC's warning about it is not relayed
    assert stage_log_line("WARNING: 'data/interim/template_rejects.jsonl' is empty.") is None
    assert stage_log_line("ValueError: bad row")[0] == logging.ERROR
    for noise in ("", "\tgit add dvc.lock reports/.gitignore", "To enable auto staging, run:",
                  "Loading weights: 100%|██████████| 21/21 [00:00<00:00, 25223.48it/s]"):
        assert stage_log_line(noise) is None, noise
    assert stage_log_line("Running stage 'train':") == (logging.INFO, "Running stage 'train':")
