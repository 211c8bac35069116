"""Fault points that only tests can arm: the process dies exactly where a crash hurts most.

A fault point does nothing unless both `SLUICE_TEST_FAULTS=1` and `SLUICE_TEST_FAULT=<name>`
are in the environment, which no deployment sets; tests use it to hit a crash window
deterministically instead of hoping a kill -9 lands in it.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, as an OOM kill or node loss) if armed for `name`."""
    if os.environ.get("SLUICE_TEST_FAULTS") == "1" and os.environ.get("SLUICE_TEST_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
