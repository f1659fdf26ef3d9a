"""Handing work over through a DVC remote, for real: `pip install 'loraflow[s3]'` brings the plugin, and
data pushed to an S3-compatible server (moto's, on 127.0.0.1) comes back byte-identical in a fresh clone."""
from __future__ import annotations

import os
import subprocess
import time
from importlib.metadata import requires

import pytest

from conftest import BIN, free_port, sh, stop_group


def test_remote_extras_name_the_dvc_plugins():
    wanted = {"s3": "dvc-s3", "ssh": "dvc-ssh", "gs": "dvc-gs"}
    for extra, plugin in wanted.items():
        assert any(r.startswith(plugin) and f'extra == "{extra}"' in r for r in requires("loraflow")), extra


@pytest.fixture
def s3_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "loraflow", "AWS_SECRET_ACCESS_KEY": "loraflow", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3
    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=url, aws_access_key_id="loraflow", aws_secret_access_key="loraflow",
                         region_name="us-east-1").create_bucket(Bucket="handoff")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.3)
    yield url, env
    stop_group(proc, grace=10)


def test_data_pushed_to_an_s3_remote_comes_back_identical_in_a_clone(tmp_path, s3_server):
    url, env = s3_server
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    payload = os.urandom(300_000) + "é ünïcode\n".encode()
    (repo / "adapter.bin").write_bytes(payload)
    sh([str(BIN / "dvc"), "add", "-q", "adapter.bin"], repo)
    sh([str(BIN / "dvc"), "remote", "add", "-d", "shared", "s3://handoff/loraflow"], repo)
    sh([str(BIN / "dvc"), "remote", "modify", "shared", "endpointurl", url], repo)
    sh([*git, "add", "-A"], repo)
    sh([*git, "commit", "-qm", "handoff"], repo)
    sh([str(BIN / "dvc"), "push", "-q"], repo, **env)
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "adapter.bin").exists()
    sh([str(BIN / "dvc"), "pull", "-q"], clone, **env)
    assert (clone / "adapter.bin").read_bytes() == payload
    assert sh([str(BIN / "dvc"), "status", "-c", "-q"], clone, **env).returncode == 0  # the remote holds it all
