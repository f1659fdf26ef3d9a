"""The flow's retries, for real: a stage SIGKILLed in a flow run against a Prefect server is retried
and the run completes; a stage that rejects its input fails once, not three times."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import (BIN, dvc_status, edit_params, last_flow_run_tasks, make_tiny, make_workspace, prefect_env,
                      run_flow, sh)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_ws(tmp_path_factory, prefect_server):
    ws = make_workspace(tmp_path_factory.mktemp("fault_ws"))
    make_tiny(ws)
    run_flow(ws, prefect_server)
    return ws


def task_run(server: dict, stage: str) -> dict:
    _, tasks = last_flow_run_tasks(server)
    return next(t for t in tasks if t["name"] == stage)


def test_a_killed_stage_is_retried_and_the_run_completes(fault_ws, prefect_server, tmp_path):
    edit_params(fault_ws, promote={"min_gain_over_promoted": -0.5})  # promote is out of date: the run executes it
    once = tmp_path / "died-once"
    lines = run_flow(fault_ws, prefect_server, **{"LORAFLOW_FAULT": "rename:reports/stages/promote.json",
                                                  "LORAFLOW_FAULT_ONCE": str(once), "LORAFLOW_RETRY_DELAY_S": "1"})
    assert once.exists()  # the first try was SIGKILLed as it was about to publish its summary
    assert lines["promote"].startswith("ran in") and (fault_ws / "reports/stages/promote.json").is_file()
    assert task_run(prefect_server, "promote")["run_count"] == 2
    assert not dvc_status(fault_ws)


def test_a_stage_dvc_restores_from_its_run_cache_is_not_reported_as_run(fault_ws, prefect_server):
    before = yaml.safe_load((fault_ws / "params.yaml").read_text())["evaluate"]["samples_in_report"]
    edit_params(fault_ws, evaluate={"samples_in_report": before + 3})
    assert run_flow(fault_ws, prefect_server)["evaluate"].startswith("ran in")
    edit_params(fault_ws, evaluate={"samples_in_report": before})  # the value an earlier run used
    assert run_flow(fault_ws, prefect_server)["evaluate"] == "restored from the DVC run cache"


def test_an_input_error_fails_once_without_retries(fault_ws, prefect_server):
    params = fault_ws / "params.yaml"
    kept = params.read_text()
    try:
        proc = sh([str(BIN / "loraflow"), "run", "--workdir", str(fault_ws), "-S", "validate.max_reject_fraction=0.0"],
                  fault_ws, check=False, LORAFLOW_RETRY_DELAY_S="1", **prefect_env(prefect_server))
    finally:
        params.write_text(kept)
    assert proc.returncode != 0
    validate = task_run(prefect_server, "validate")
    assert validate["state_type"] == "FAILED" and validate["run_count"] == 1
    # the failed run still publishes why: the validation report and the rejected rows
    from conftest import api
    keys = {a["key"] for a in api(prefect_server, "/artifacts/filter",
                                  {"artifacts": {"flow_run_id": {"any_": [validate["flow_run_id"]]}}})}
    assert {"validation-report", "rejects"} <= keys


def test_killing_the_flow_kills_its_stage_and_frees_the_workspace(fault_ws, prefect_server):
    """kill -9 of `loraflow run` while a stage trains: dvc and the stage die with it (no orphan keeps
    training on models/checkpoints), and the next run takes the workspace and completes."""
    import os
    import signal
    import subprocess
    from conftest import tool_env, wait_for_stage
    edit_params(fault_ws, train={"seed": 7})  # train is out of date: the run executes it
    runner = subprocess.Popen([str(BIN / "loraflow"), "run", "--workdir", str(fault_ws)], cwd=fault_ws,
                              env=tool_env(**prefect_env(prefect_server)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert wait_for_stage("train", fault_ws, running=True, timeout_s=180, runner=runner), "training never started"
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    assert wait_for_stage("train", fault_ws, running=False, timeout_s=15) == []
    rerun = sh([str(BIN / "loraflow"), "run", "--workdir", str(fault_ws)], fault_ws, **prefect_env(prefect_server))
    assert re.search(r"^train: ran in", rerun.stdout, re.M), rerun.stdout
    # the dead run's GPU slot comes back when its lease lapses (the server checks every 15 s), and
    # the rerun says that it waits instead of hanging without a word
    from flows.finetune import GPU_LEASE_S
    out = rerun.stdout + rerun.stderr
    assert "waits for the GPU slot" in out, out[-3000:]
    waited = [float(s) for s in re.findall(r"got the GPU slot after (\d+) s", out)]
    assert waited and max(waited) <= GPU_LEASE_S + 15 + 15, out[-3000:]


def test_a_stage_timeout_ends_the_stage_process_too(fault_ws, prefect_server):
    """schedule.stage_timeout_s reached while train runs: the run fails and no stage process runs on."""
    from conftest import wait_for_stage
    edit_params(fault_ws, train={"seed": 8}, schedule={"stage_timeout_s": 4})
    try:
        proc = sh([str(BIN / "loraflow"), "run", "--workdir", str(fault_ws)], fault_ws, check=False,
                  **prefect_env(prefect_server))
    finally:
        edit_params(fault_ws, schedule={"stage_timeout_s": 43200})
    assert proc.returncode != 0 and "timed out" in (proc.stdout + proc.stderr).lower()
    assert wait_for_stage("train", fault_ws, running=False, timeout_s=15) == []
    # dvc repro deleted train's outputs as it started; the run put the last good ones back, so only the
    # changed seed makes train stale, not missing outputs
    status = dvc_status(fault_ws)
    assert set(status) == {"train"} and "deleted" not in json.dumps(status), status
    assert (fault_ws / "models/adapter/adapter_model.safetensors").is_file()
    assert "last good outputs are restored" in proc.stdout + proc.stderr
