"""Deployments, scheduled retraining, handoffs and lineage, against real components: a served
deployment on a real local Prefect server triggered by the real `prefect deployment run`, real
DVC remotes and clones, real `dvc exp run`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import yaml

from conftest import (BIN, api, dvc_status, make_workspace, prefect_env, read_json, run_flow, sh, tool_env)

pytestmark = pytest.mark.slow
CRON = "0 3 * * *"
DEPLOYMENT = "finetune/t-nightly"


@pytest.fixture(scope="module")
def ws(flow_ws):
    return flow_ws.path


@pytest.fixture(scope="module")
def served(ws, prefect_server):
    """`loraflow serve` running in the background for the workspace; yields the deployment."""
    log = open(ws / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "loraflow"), "serve", "--name", "t-nightly", "--cron", CRON, "--workdir", str(ws)],
                            cwd=ws, env=tool_env(**prefect_env(prefect_server), PREFECT_RUNNER_POLL_FREQUENCY="2"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            deployment = api(prefect_server, f"/deployments/name/{DEPLOYMENT}")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((ws / "serve.log").read_text()[-3000:])
            time.sleep(1)
    yield deployment
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def trigger(ws, server, overrides: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """The real `prefect deployment run ... --watch`; returns the process and the flow run it made."""
    args = [str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "900"]
    if overrides is not None:
        args += ["--param", f"overrides={json.dumps(overrides)}"]
    proc = sh(args, ws, check=False, **prefect_env(server))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)
    return proc, api(server, f"/flow_runs/{run_id}")


def tasks_of(server, run_id) -> list[dict]:
    return api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})


def logs_of(server, run_id) -> str:
    return "\n".join(l["message"] for l in api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}}))


def test_schedule_is_registered_with_the_cron_asked_for(served):
    crons = [s["schedule"].get("cron") for s in served["schedules"]]
    assert crons == [CRON] and all(s["active"] for s in served["schedules"])


def test_cron_comes_from_the_command_line_else_from_params(ws):
    from flows.deploy import resolve_cron
    assert resolve_cron("*/5 * * * *", str(ws)) == "*/5 * * * *"
    assert resolve_cron(None, str(ws)) == yaml.safe_load((ws / "params.yaml").read_text())["schedule"]["cron"] == CRON


def test_triggered_run_applies_overrides_and_records_them(ws, served, prefect_server):
    overrides = {"evaluate.max_new_tokens": 6, "evaluate.max_rows": 10}
    proc, run = trigger(ws, prefect_server, overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run["state_type"] == "COMPLETED"
    assert re.fullmatch(r"data-[0-9a-f]{8}-params-[0-9a-f]{8}", run["name"])
    assert yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["max_new_tokens"] == 6
    metrics = read_json(ws, "reports/metrics.json")
    assert metrics["max_new_tokens"] == 6 and metrics["rows"] == 10
    record = read_json(ws, "reports/last_flow_run.json")
    assert record["overrides"] == overrides and record["flow_run_id"] == run["id"]
    assert record["executed"] == ["evaluate", "promote", "lineage"]
    keys = {a["key"] for a in api(prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert {"metrics", "generation-audit", "validation-report", "promotion", "report-files", "stages"} <= keys
    assert dvc_status(ws) == {}


def test_run_with_nothing_changed_executes_no_stage(ws, served, prefect_server):
    proc, run = trigger(ws, prefect_server)
    assert proc.returncode == 0 and run["state_type"] == "COMPLETED"
    assert read_json(ws, "reports/last_flow_run.json")["executed"] == []
    assert "nothing changed since the last run" in logs_of(prefect_server, run["id"])
    print(f"no-change run: {run['total_run_time']:.1f}s of flow run time")


def test_bad_override_fails_the_run_at_once_naming_it(ws, served, prefect_server):
    before = (ws / "params.yaml").read_text()
    proc, run = trigger(ws, prefect_server, {"train.lrr": 0.1})
    assert proc.returncode != 0 and run["state_type"] == "FAILED"
    assert "train.lrr: unknown key" in run["state"]["message"] + logs_of(prefect_server, run["id"])
    assert tasks_of(prefect_server, run["id"]) == []  # no stage ran
    assert (ws / "params.yaml").read_text() == before


def test_overlapping_runs_second_fails_clearly_and_workspace_stays_intact(ws, prefect_server):
    lock_file = ws / ".dvc/tmp/loraflow-run.lock"
    first = subprocess.Popen([str(BIN / "loraflow"), "run", "--workdir", str(ws), "-S", "train.max_steps=24"], cwd=ws,
                             env=tool_env(**prefect_env(prefect_server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 120
    while not (lock_file.exists() and lock_file.read_text().strip()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the workspace"
        time.sleep(0.2)
    second = sh([str(BIN / "loraflow"), "run", "--workdir", str(ws)], ws, check=False, **prefect_env(prefect_server))
    out = first.communicate(timeout=900)[0]
    assert second.returncode != 0 and "is busy" in second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr  # said plainly, before Prefect starts a run
    assert first.returncode == 0, out
    assert "train: ran in" in out
    assert dvc_status(ws) == {}
    yaml.safe_load((ws / "dvc.lock").read_text())  # still a whole, parseable lock


def test_new_raw_data_reruns_from_ingest(ws, prefect_server):
    with open(ws / "data/raw/alpaca.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "What is the capital of Malta?", "input": "", "output": "Valletta",
                            "family": "capital"}) + "\n")
    lines = run_flow(ws, prefect_server)
    assert lines["base"] == "up to date" and lines["ingest"].startswith("ran in")
    assert read_json(ws, "reports/validation.json")["read"] == read_json(ws, "reports/stages/ingest.json")["rows"]
    assert dvc_status(ws) == {}


def test_lineage_links_raw_data_to_metrics(ws):
    sh(["git", "add", "-A"], ws)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results"], ws)
    run_flow_free = sh([str(BIN / "dvc"), "repro", "lineage", "--force", "--single-item"], ws)
    assert "Running stage 'lineage'" in run_flow_free.stdout
    lineage = read_json(ws, "reports/lineage.json")
    assert [l["name"] for l in lineage["chain"]][:1] == ["raw"] and all(l["md5"] for l in lineage["chain"])
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    adapter = next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "models/adapter")
    assert next(l["md5"] for l in lineage["chain"] if l["name"] == "adapter") == adapter
    assert lineage["code"]["git_commit"] == sh(["git", "rev-parse", "HEAD"], ws).stdout.strip()
    assert lineage["base_model"]["id"] == "bundled" and lineage["params"]["train"]["max_steps"] == 24
    printed = sh([str(BIN / "loraflow"), "lineage"], ws).stdout
    assert "raw" in printed and adapter[:12] in printed


def test_experiments_run_and_show_with_metrics(ws):
    sh(["git", "add", "-A"], ws)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "before experiments"], ws)
    sh([str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.004", "--name", "lr-high"], ws)
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], ws).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {run["name"]: run for e in exps for run in e.get("revs", [])}
    assert "lr-high" in names
    data = names["lr-high"]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.004
    assert "tuned" in data["metrics"]["reports/metrics.json"]["data"]


def test_remote_round_trip_between_two_clones(ws, tmp_path):
    remote = tmp_path / "remote"
    sh([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote)], ws)
    sh(["git", "add", "-A"], ws)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "share results"], ws)
    sh([str(BIN / "dvc"), "push"], ws)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ws), str(clone)], tmp_path)
    assert not (clone / "models/adapter").exists()
    sh([str(BIN / "dvc"), "pull"], clone)
    assert dvc_status(clone) == {}
    for rel in ["data/processed/train.parquet", "models/adapter/adapter_model.safetensors",
                "models/merged/model.safetensors", "reports/metrics.json", "reports/lineage.json"]:
        assert (clone / rel).read_bytes() == (ws / rel).read_bytes(), rel
    out = sh([str(BIN / "dvc"), "repro"], clone).stdout
    assert "Running stage" not in out
