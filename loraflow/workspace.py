"""One run at a time per workspace.

DVC keeps dvc.lock consistent on its own, but two flow runs interleaving stages on one workspace
would train on each other's half-updated params. The flow holds an exclusive lock file for its
whole run; a second run waits up to `wait_s`, then fails naming the holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from loraflow.errors import LoraflowError

LOCK_NAME = ".dvc/tmp/loraflow-run.lock"


@contextlib.contextmanager
def workspace_lock(root: Path, *, wait_s: float = 0, holder: str = "") -> Iterator[None]:
    path = root / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    who = f.read().strip() or "another process"
                    raise LoraflowError(f"workspace {root} is busy: {who}. Wait for that run to finish, or "
                                        "trigger this one with wait_for_workspace_s set.") from None
                time.sleep(min(2.0, max(deadline - time.monotonic(), 0.05)))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"holder": holder, "pid": os.getpid(),
                            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
