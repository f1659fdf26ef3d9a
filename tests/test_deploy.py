"""Deployments, scheduled retraining, handoffs and lineage, against real components: a served
deployment on a real local Prefect server triggered by the real `prefect deployment run`, real
DVC remotes and clones, real `dvc exp run`."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from loraflow.layout import STAGES
from conftest import (BIN, api, dvc_status, edit_params, last_flow_run, prefect_env, read_json, run_flow, sh,
                      stop_group, tool_env)

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
    stop_group(proc)


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


def log_records(server, run_id) -> list[dict]:
    """Every log record of a flow run, oldest first (the API answers 200 at a time)."""
    records: list[dict] = []
    while True:
        page = api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC",
                                            "offset": len(records), "limit": 200})
        records += page
        if len(page) < 200:
            return records


def logs_of(server, run_id) -> str:
    return "\n".join(l["message"] for l in log_records(server, run_id))


def test_schedule_is_registered_with_the_cron_asked_for(served):
    crons = [s["schedule"].get("cron") for s in served["schedules"]]
    assert crons == [CRON] and all(s["active"] for s in served["schedules"])


def test_cron_comes_from_the_command_line_else_from_params(ws):
    from flows.deploy import resolve_cron
    assert resolve_cron("*/5 * * * *", str(ws)) == "*/5 * * * *"
    assert resolve_cron(None, str(ws)) == yaml.safe_load((ws / "params.yaml").read_text())["schedule"]["cron"] == CRON


def test_triggered_run_applies_overrides_for_that_run_only(ws, served, prefect_server):
    params_before = (ws / "params.yaml").read_text()
    default_rows = read_json(ws, "reports/metrics.json")["rows"]
    overrides = {"evaluate.max_new_tokens": 6, "evaluate.max_rows": 10}
    proc, run = trigger(ws, prefect_server, overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run["state_type"] == "COMPLETED"
    assert re.fullmatch(r"data-[0-9a-f]{8}-params-[0-9a-f]{8}", run["name"])
    metrics = read_json(ws, "reports/metrics.json")
    assert metrics["max_new_tokens"] == 6 and metrics["rows"] == 10
    record = read_json(ws, "reports/last_flow_run.json")
    assert record["overrides"] == overrides and record["params_used"] == overrides and record["flow_run_id"] == run["id"]
    assert record["executed"] == ["evaluate", "promote", "lineage"]
    keys = {a["key"] for a in api(prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert {"metrics", "generation-audit", "validation-report", "promotion", "report-files", "stages", "loss-curve",
            "mask-audit"} <= keys
    curve = api(prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["loss-curve"]},
                                                                    "flow_run_id": {"any_": [run["id"]]}}})[0]
    assert "| step | loss |" in curve["data"] and any(mark in curve["data"] for mark in "▁▂▃▄▅▆▇█")  # numbers, chart
    shown = api(prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["metrics"]},
                                                                    "flow_run_id": {"any_": [run["id"]]}}})[0]["data"]
    assert "By family:" in shown and all(f"| {name} |" in shown for name in metrics["by_family"])
    files = api(prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["report-files"]},
                                                                    "flow_run_id": {"any_": [run["id"]]}}})[0]
    assert "file://" not in json.dumps(files["data"]) and "reports/metrics.json" in json.dumps(files["data"])
    # params.yaml is as it was, byte for byte; dvc.lock and the outputs are this run's, so DVC names
    # the overridden params as what differs, and nothing else
    assert (ws / "params.yaml").read_text() == params_before
    assert dvc_status(ws) == {"evaluate": [{"changed deps": {"params.yaml": {"evaluate": "modified"}}}]}

    # the next run without overrides (the nightly schedule) reads params.yaml's own values again
    proc, run = trigger(ws, prefect_server)
    assert proc.returncode == 0 and run["state_type"] == "COMPLETED"
    assert read_json(ws, "reports/last_flow_run.json")["executed"] == ["evaluate", "promote", "lineage"]
    assert read_json(ws, "reports/metrics.json")["rows"] == default_rows != 10
    assert dvc_status(ws) == {}


def test_the_work_pool_path_runs_under_the_gpu_limit_and_queues_its_runs(ws, served, prefect_server):
    """prefect.yaml's deployment through a real process work pool and worker: the run creates the GPU
    limit when the server has none (here deleted first) and holds it strictly; the deployment is
    registered with its own limit of one run and ENQUEUE, so Prefect queues a second run."""
    env = {**prefect_env(prefect_server), "LORAFLOW_WORKDIR": str(ws)}
    sh([str(BIN / "prefect"), "work-pool", "create", "loraflow", "--type", "process"], ws, **env)
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], ws, **env)
    deployment = api(prefect_server, "/deployments/name/finetune/nightly")
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    urllib_delete(prefect_server, "/v2/concurrency_limits/loraflow-gpu")
    log = open(ws / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "loraflow"], cwd=ws,
                              env=tool_env(**env, PREFECT_WORKER_QUERY_SECONDS="2"), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        edit_params(ws, evaluate={"samples_in_report": 7})  # evaluate (a GPU stage) is stale: it runs under the limit
        proc = sh([str(BIN / "prefect"), "deployment", "run", "finetune/nightly", "--watch", "--watch-timeout", "900"],
                  ws, check=False, **env)
        run = api(prefect_server, f"/flow_runs/{re.search(r'UUID: ([0-9a-f-]{36})', proc.stdout).group(1)}")
    finally:
        stop_group(worker)
        # its cron has made runs for the coming days: remove them with it (the server is shared)
        urllib_delete(prefect_server, f"/deployments/{deployment['id']}")
    assert run["state_type"] == "COMPLETED", proc.stdout + (ws / "worker.log").read_text()[-3000:]
    assert read_json(ws, "reports/last_flow_run.json")["executed"][0] == "evaluate"
    limit = api(prefect_server, "/v2/concurrency_limits/loraflow-gpu")
    assert limit["limit"] == 1
    logs = logs_of(prefect_server, run["id"])
    assert "created the global concurrency limit 'loraflow-gpu'" in logs and "do not exist" not in logs
    assert dvc_status(ws) == {}


def urllib_delete(server: dict, path: str, attempts: int = 20) -> None:
    """DELETE on the server's API, retried while it answers 503 (its SQLite database busy with the
    scheduler or a worker that just stopped)."""
    import urllib.error
    import urllib.request
    for attempt in range(attempts):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{server['url']}{path}", method="DELETE"), timeout=30).close()
            return
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(1)


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
    # the -S override was for that run only: train's recorded params differ from params.yaml's now
    assert dvc_status(ws) == {"train": [{"changed deps": {"params.yaml": {"train": "modified"}}}]}
    yaml.safe_load((ws / "dvc.lock").read_text())  # still a whole, parseable lock


def test_stage_output_reaches_the_flow_log_line_by_line_at_its_own_level(ws, prefect_server):
    """A stage's log lines arrive in the flow run's log as they happen, at their own level (a refused
    promotion is a WARNING in the UI), once each, without a second timestamp, tqdm bars or DVC's git
    hints."""
    proc = sh([str(BIN / "loraflow"), "run", "--workdir", str(ws), "-S", "train.max_steps=3", "-S", "train.logging_steps=1",
               "-S", "promote.min_gain_over_base=5"], ws, **prefect_env(prefect_server))
    run = last_flow_run(prefect_server)
    logs = log_records(prefect_server, run["id"])
    messages = [l["message"] for l in logs]
    refused = [l for l in logs if "adapter NOT promoted" in l["message"]]
    assert refused and all(l["level"] == 30 for l in refused), proc.stdout[-2000:]
    steps = [m for m in messages if re.search(r"loraflow\.train: step \d+/3 loss", m)]
    assert len(steps) == 3, steps  # each optimizer step once: the Trainer's own printout is off
    assert not [m for m in messages if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", m)]
    assert not [m for m in messages if "git add dvc.lock" in m or "{'loss'" in m or "it/s]" in m]
    # the stage's lines came while it ran, not in one burst at its end
    from datetime import datetime
    stamps = [datetime.fromisoformat(l["timestamp"]) for l in logs if l["message"].startswith("loraflow.train:")]
    assert (stamps[-1] - stamps[0]).total_seconds() > 0.5, "train's lines arrived in one burst"


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
    max_steps = yaml.safe_load((ws / "params.yaml").read_text())["train"]["max_steps"]
    assert lineage["base_model"]["id"] == "bundled" and lineage["params"]["train"]["max_steps"] == max_steps
    # every stage's summary says where it ran; the test's stages all ran here, with this suite's torch
    import torch
    from loraflow.stage import cpu_model
    envs = lineage["environments"]
    assert set(envs) == set(STAGES) - {"lineage"} and all(envs.values()), envs
    assert {e["cpu"] for e in envs.values()} == {cpu_model()}
    assert envs["train"]["packages"]["torch"] == torch.__version__ and "peft" in envs["train"]["packages"]
    assert "torch" not in envs["validate"]["packages"], "a stage records only the libraries it loaded"
    printed = sh([str(BIN / "loraflow"), "lineage"], ws).stdout
    assert "raw" in printed and adapter[:12] in printed
    assert f"ran on    {cpu_model()}" in printed and "train" in printed.split("ran on")[-1]


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
    assert "exact_match" in data["metrics"]["reports/scores/tuned.json"]["data"]


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
