"""Shared fixtures: a tiny tokenizer/model built locally, project workspaces in temporary git repos,
and a real Prefect server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import urllib.request
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from loraflow import layout

ROOT = Path(__file__).resolve().parent.parent
STAGES = list(layout.STAGES)
BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tool_env(**extra: str) -> dict:
    """Environment for subprocesses: this venv's dvc/python/prefect first on PATH, offline."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def sh(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=tool_env(**env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def make_workspace(dest: Path) -> Path:
    """A copy of the project (tracked and untracked-not-ignored files) in a fresh git repo, without
    this checkout's own run record (dvc.lock), so every stage starts out of date."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(lambda f: f and f != "dvc.lock", files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "workspace"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tasks.base import read_corpus, train_tokenizer
    return train_tokenizer(read_corpus(ROOT / "data/base_corpus.txt"), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from loraflow.params import BundledBase
    from tasks.base import build_model
    path = tmp_path_factory.mktemp("tiny_model")
    model = build_model(tiny_tokenizer, BundledBase(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM a background tool's process group (started with start_new_session), then SIGKILL it if it
    is still up after `grace` seconds: a Prefect worker told to stop while its server connection is
    failing backs off for 60 s before it looks at the signal again, and a test must not fail on a
    helper's slow exit."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own SQLite home; yields its API URL."""
    import urllib.request
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = tool_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", PREFECT_API_URL=url)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield {"url": url, "home": str(home)}
    stop_group(proc)


def prefect_env(server: dict) -> dict:
    return {"PREFECT_API_URL": server["url"], "PREFECT_HOME": server["home"]}


def read_json(ws: Path, rel: str):
    return json.loads((ws / rel).read_text())


def dvc_status(ws: Path) -> dict:
    return json.loads(sh([str(BIN / "dvc"), "status", "--json"], ws).stdout or "{}")


def stage_mtimes(ws: Path) -> dict:
    return {s: (ws / f"reports/stages/{s}.json").stat().st_mtime_ns for s in STAGES}


def run_flow(ws: Path, server: dict, *args: str, **env: str) -> dict[str, str]:
    """`loraflow run` against the server; returns each stage's line ('ran in ...' or 'up to date')."""
    out = sh([str(BIN / "loraflow"), "run", "--workdir", str(ws), *args], ws, **prefect_env(server), **env).stdout
    lines = dict(l.strip().split(": ", 1) for l in out.splitlines() if l.strip().split(": ", 1)[0] in STAGES)
    assert set(lines) == set(STAGES), out
    return lines


def api(server: dict, path: str, body: dict | None = None):
    """The Prefect server's REST API: POST with a body, GET without."""
    req = urllib.request.Request(f"{server['url']}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def last_flow_run(server: dict) -> dict:
    """The newest flow run that has started (a deployment's schedule also makes future, scheduled ones)."""
    return api(server, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1, "flow_runs": {
        "state": {"type": {"not_any_": ["SCHEDULED", "PENDING"]}}}})[0]


def last_flow_run_tasks(server: dict) -> tuple[dict, list[dict]]:
    runs = [last_flow_run(server)]
    tasks = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    return runs[0], tasks


def edit_params(ws: Path, **sections: dict) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_tiny(ws: Path, save_steps: int = 10) -> None:
    """Shrink a workspace's model and run sizes: for tests of wiring and faults, not of quality."""
    edit_params(ws, base={"bundled": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2,
                                      "pretrain_steps": 40, "vocab_size": 600}},
                train={"max_steps": 20, "save_steps": save_steps}, evaluate={"max_rows": 20, "max_new_tokens": 8})


@pytest.fixture(scope="session")
def flow_ws(tmp_path_factory, prefect_server):
    """A fresh workspace run first by the Prefect flow (smaller sizes: this checks wiring, not quality)."""
    ws = make_workspace(tmp_path_factory.mktemp("flow_ws"))
    make_tiny(ws)
    lines = run_flow(ws, prefect_server)
    assert all(v.startswith("ran in") for v in lines.values()), lines
    run, tasks = last_flow_run_tasks(prefect_server)
    return SimpleNamespace(path=ws, first_run=run, first_tasks=tasks)




def templated(df, tokenizer, **template_params):
    """The template stage's rows for `df` with this tokenizer's own chat template; no row may be rejected."""
    from loraflow.chat_format import chat_format_for
    from loraflow.params import TemplateParams
    from tasks.template import template_rows
    params = TemplateParams(**template_params)
    render, chat = chat_format_for(tokenizer, params)
    out, rejects = template_rows(df, render, chat, params)
    assert not rejects, rejects
    return out


def stage_processes(stage: str, ws: Path) -> list[int]:
    """PIDs of running `python -m tasks.<stage>` processes working in the workspace `ws`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if f"tasks.{stage}".encode() in cmd and Path(cwd) == Path(ws).resolve():
            found.append(int(pid))
    return found


def wait_for_stage(stage: str, ws: Path, running: bool, timeout_s: float, runner=None) -> list[int]:
    """Poll until the stage's processes in `ws` are running (or all gone); returns them. `runner`: a
    Popen that must not end first."""
    deadline = time.time() + timeout_s
    while bool(stage_processes(stage, ws)) != running and time.time() < deadline:
        assert runner is None or runner.poll() is None, "the runner ended first"
        time.sleep(0.2)
    return stage_processes(stage, ws)
