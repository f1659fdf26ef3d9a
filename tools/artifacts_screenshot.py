"""The flow run's artifacts as the Prefect UI shows them, photographed by headless Chromium: the check
that what `publish_artifacts` writes renders (the metrics table, the generation audit, the loss curve).

    .venv/bin/python tools/artifacts_screenshot.py OUT_DIR [--tiny]   # needs `chromium` on PATH

Starts a Prefect server with its UI on 127.0.0.1, runs the flow on a workspace copy of this project
(the bundled default; --tiny: the tests' sizes, for wiring only), then writes OUT_DIR/<artifact key>.png
for each artifact page.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))
KEYS = ("metrics", "loss-curve", "generation-audit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main(out_dir: str, tiny: bool = False) -> None:
    from conftest import make_tiny, make_workspace  # the tests' workspace helpers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    tmp = Path(tempfile.mkdtemp(prefix="loraflow-shot-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api_url, "HF_HUB_OFFLINE": "1",
           "PREFECT_UI_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                api(api_url, "/health")
                break
            except OSError:
                time.sleep(1)
        ws = make_workspace(tmp / "ws")
        if tiny:
            make_tiny(ws)
        subprocess.run([str(BIN / "loraflow"), "run", "--workdir", str(ws)], cwd=ws, env=env, check=True)
        run = api(api_url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
        artifacts = api(api_url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        for a in artifacts:
            if a["key"] not in KEYS:
                continue
            shot = out / f"{a['key']}.png"
            subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1280,1400", "--virtual-time-budget=20000", f"--screenshot={shot}",
                            f"http://127.0.0.1:{port}/artifacts/artifact/{a['id']}"],
                           check=True, capture_output=True, timeout=120)
            print(f"{a['key']}: {shot}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--tiny"]
    main(args[0] if args else "docs/artifacts", tiny="--tiny" in sys.argv)
