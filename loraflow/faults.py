"""Fault injection for the kill tests: SIGKILL a stage at a named point, as a dying machine would.

Off unless LORAFLOW_FAULT is set. Points: `rename:<path>` (an output is fully written but not yet
renamed into place) and `save:<step>` (train, right after the checkpoint of that step is saved).
"""
from __future__ import annotations

import os
import signal

ENV = "LORAFLOW_FAULT"


def maybe_die(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
