"""A stage dies with whatever runs it: `dvc repro`, the flow, a timed-out task.

Killed with SIGKILL, a runner cannot pass anything on, so its children would run on as orphans
(a second run then trains beside the first, on the same checkpoint folder). Linux's parent-death
signal makes the kernel kill the child instead. Elsewhere this is a no-op.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (call it in the child)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took: go now
        os.kill(os.getpid(), sig)
