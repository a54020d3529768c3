"""Fault injection for the reliability tests: ``DDETR_KILL_AT=POINT[:N]`` SIGKILLs the process the Nth time (default
1st) it reaches POINT: ``step`` (after a backward pass, before the optimiser step), ``evaluate`` (start of an epoch's
evaluation) or ``checkpoint-write`` (checkpoint bytes written to the temporary file, not yet renamed). Unset, as
always outside those tests, a point costs one environment lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """A named moment where the tests may kill the process, as a power cut or the OOM killer would."""
    spec = os.environ.get("DDETR_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
