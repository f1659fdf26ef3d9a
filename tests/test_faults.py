"""Faults: every stage killed with SIGKILL part-way leaves nothing that DVC or the flow takes as
complete, and its rerun completes; a killed training run resumes from its last checkpoint and ends
where an uninterrupted one does; two runs give identical results; no secret reaches logs or reports."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, dvc_status, make_tiny, make_workspace, read_json, sh, wait_for_stage

pytestmark = pytest.mark.slow
DVC = str(BIN / "dvc")
FAKE_TOKEN = "hf_PlantedFakeToken0123456789abcdefXYZ"

# (stage, an output it writes atomically): the kill lands after the output is written in full
# under its temporary name, just before the rename that would publish it.
KILL_POINTS = [("base", "models/base"), ("ingest", "data/interim/ingested.parquet"),
               ("validate", "data/interim/validated.parquet"), ("template", "data/interim/templated.parquet"),
               ("tokenize", "data/processed/eval.parquet"), ("train", "models/adapter"), ("merge", "models/merged"),
               ("evaluate", "reports/metrics.json"), ("promote", "reports/promotion.json"),
               ("lineage", "reports/lineage.json")]


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("tiny_ws"))
    make_tiny(ws, save_steps=5)
    sh([DVC, "repro"], ws)
    return ws


@pytest.mark.parametrize("stage, output", KILL_POINTS, ids=[s for s, _ in KILL_POINTS])
def test_killed_stage_leaves_no_complete_looking_output_and_reruns(tiny_ws, stage, output):
    killed = sh([DVC, "repro", "--force", "--single-item", stage], tiny_ws, check=False, LORAFLOW_FAULT=f"rename:{output}")
    assert killed.returncode != 0, killed.stdout
    assert not (tiny_ws / output).exists(), f"{output} exists after the kill"
    assert stage in dvc_status(tiny_ws), "DVC must see the killed stage as not done"
    # --force: really execute the stage (plain `dvc repro` would restore the last complete outputs
    # from DVC's cache, which is also right, but would not exercise the rerun)
    rerun = sh([DVC, "repro", "--single-item", "--force", stage], tiny_ws)
    assert f"Running stage '{stage}'" in rerun.stdout
    assert (tiny_ws / output).exists()
    # the rerun is recorded as done. Only lineage, which reads each stage's summary (its seconds and the
    # machine it ran on), may see summaries changed, this case's or earlier ones' (a fast stage can
    # repeat its seconds); lineage, the last case, brings itself up to date
    status = dvc_status(tiny_ws)
    if stage == "lineage":
        assert status == {}
    elif status:
        assert set(status) == {"lineage"}, status
        changed = {dep for entry in status["lineage"] for dep in entry.get("changed deps", {})}
        assert changed and all(d.startswith("reports/stages/") for d in changed), status
    leftovers = list((tiny_ws / output).parent.glob(f".{(tiny_ws / output).name}.tmp-*"))
    assert leftovers == [], "the rerun clears what the killed writer left"


def adapter_tensors(ws):
    return load_file(str(ws / "models/adapter/adapter_model.safetensors"))


def test_killed_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_ws):
    shutil.rmtree(tiny_ws / "models/checkpoints", ignore_errors=True)
    killed = sh([DVC, "repro", "--force", "--single-item", "train"], tiny_ws, check=False, LORAFLOW_FAULT="save:10")
    assert killed.returncode != 0
    assert (tiny_ws / "models/checkpoints/checkpoint-10").is_dir() and not (tiny_ws / "models/adapter").exists()
    # a later save cut short (a kill or a full disk mid-write): no trainer_state.json, a truncated optimizer
    partial = tiny_ws / "models/checkpoints/checkpoint-15"
    shutil.copytree(tiny_ws / "models/checkpoints/checkpoint-10", partial)
    (partial / "trainer_state.json").unlink()
    (partial / "optimizer.pt").write_bytes((partial / "optimizer.pt").read_bytes()[:100])
    # --force: this very run finished once before (the fixture), so plain repro would restore it from the cache
    resumed_run = sh([DVC, "repro", "--single-item", "--force", "train"], tiny_ws)
    log = resumed_run.stderr + resumed_run.stdout
    assert "ignoring an incomplete checkpoint" in log and "checkpoint-15" in log
    assert "checkpoint-10, the newest complete checkpoint" in log
    summary = read_json(tiny_ws, "reports/stages/train.json")
    assert summary["resumed"] and summary["steps"] == 20
    resumed = adapter_tensors(tiny_ws)

    assert not (tiny_ws / "models/checkpoints").exists()  # a finished run keeps none: nothing to resume past its end
    sh([DVC, "repro", "--force", "--single-item", "train"], tiny_ws)
    assert not read_json(tiny_ws, "reports/stages/train.json")["resumed"]
    assert read_json(tiny_ws, "reports/stages/train.json")["steps"] == 20
    fresh = adapter_tensors(tiny_ws)
    assert resumed.keys() == fresh.keys()
    worst = max(float((resumed[k] - fresh[k]).abs().max()) for k in fresh)
    print(f"resumed vs uninterrupted adapter: max |diff| = {worst:.3g}")
    assert worst <= 1e-6  # the stated tolerance; on CPU it is 0 (bitwise)


def test_two_runs_with_the_same_inputs_give_identical_metrics(tiny_ws):
    sh([DVC, "repro"], tiny_ws)
    first = (tiny_ws / "reports/metrics.json").read_bytes()
    first_adapter = (tiny_ws / "models/adapter/adapter_model.safetensors").read_bytes()
    shutil.rmtree(tiny_ws / "models/checkpoints", ignore_errors=True)  # a finished run keeps none; be sure
    sh([DVC, "repro", "--force"], tiny_ws)
    assert (tiny_ws / "reports/metrics.json").read_bytes() == first
    assert (tiny_ws / "models/adapter/adapter_model.safetensors").read_bytes() == first_adapter


def test_a_planted_token_never_reaches_logs_or_reports(tiny_ws):
    with open(tiny_ws / "data/raw/alpaca.jsonl", "a") as f:  # a user pasted a token into the data
        f.write(json.dumps({"instruction": f"My token is {FAKE_TOKEN}", "input": "", "output": ""}) + "\n")
        f.write(json.dumps({"instruction": "Keep this safe", "input": "", "output": f"use {FAKE_TOKEN}"}) + "\n")
    run = sh([DVC, "repro"], tiny_ws, HF_TOKEN=FAKE_TOKEN, WANDB_API_KEY="planted-secret-value-42")
    logs = run.stdout + run.stderr
    assert FAKE_TOKEN not in logs and "planted-secret-value-42" not in logs
    written = [p for d in ("reports", "models/adapter", "models/merged", "models/promoted") for p in (tiny_ws / d).rglob("*")
               if p.is_file() and p.suffix in {".json", ".jsonl", ".md", ".csv", ".txt"}]
    written += [tiny_ws / "data/interim/rejects.jsonl", tiny_ws / "data/processed/rejects.jsonl", tiny_ws / "dvc.lock"]
    assert len(written) > 10
    for path in written:
        text = path.read_text()
        assert FAKE_TOKEN not in text and "planted-secret-value-42" not in text, path
    assert "[REDACTED]" in (tiny_ws / "data/interim/rejects.jsonl").read_text()


def test_only_complete_checkpoints_are_resumed(tmp_path):
    """The newest checkpoint whose save finished; half-written ones are deleted, not resumed or fatal."""
    from loraflow.training import FINGERPRINT_FILE, prepare_checkpoints

    def checkpoint(step, state='{"global_step": 1}', optimizer=True):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"w")
        if optimizer:
            (d / "optimizer.pt").write_bytes(b"o")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (tmp_path / FINGERPRINT_FILE).write_text('{"fingerprint": "fp"}')
    checkpoint(10)
    checkpoint(20)
    checkpoint(30, state=None)                # killed before trainer_state.json
    checkpoint(40, state='{"global_st')       # disk full while writing it
    checkpoint(50, optimizer=False)
    assert prepare_checkpoints(tmp_path, "fp") == tmp_path / "checkpoint-20"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert prepare_checkpoints(tmp_path, "another run") is None and not any(tmp_path.glob("checkpoint-*"))


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_stage_dies_with_the_dvc_repro_that_runs_it(tiny_ws):
    """kill -9 of `dvc repro` while it trains: the stage must not run on, holding models/checkpoints."""
    import os
    import signal
    import subprocess
    import time
    from conftest import tool_env
    runner = subprocess.Popen([DVC, "repro", "--force", "--single-item", "train"], cwd=tiny_ws, env=tool_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_stage("train", tiny_ws, running=True, timeout_s=120), "the train stage never started"
    time.sleep(1)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    assert wait_for_stage("train", tiny_ws, running=False, timeout_s=15) == []
    sh([DVC, "repro", "--single-item", "train"], tiny_ws)  # and the next run is not blocked
