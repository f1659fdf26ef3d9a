"""Fault injection for the kill tests: SIGKILL a stage at a named point, as a dying machine would.

Off unless LORAFLOW_FAULT is set. Points: `rename:<path>` (an output is fully written but not yet
renamed into place) and `save:<step>` (train, right after the checkpoint of that step is saved).
With LORAFLOW_FAULT_ONCE=<file>, only the first process to reach the point dies (it creates the
file first): a retry then succeeds, as after a machine that died once.
"""
from __future__ import annotations

import os
import signal

ENV = "LORAFLOW_FAULT"


ONCE_ENV = "LORAFLOW_FAULT_ONCE"


def maybe_die(point: str) -> None:
    if os.environ.get(ENV) != point:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # died once already
    os.kill(os.getpid(), signal.SIGKILL)
