"""Where the CPU went during a phase: seconds per process tree, the broker, this process, and
everything else on the machine (on a shared machine, other people's work)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped, import-not-found, unused-ignore]


def _tree_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _broker_pids() -> list[int]:
    """Our descendants that are the Erlang VM: the private RabbitMQ node."""
    found: list[int] = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name().startswith("beam"):
                found.append(child.pid)
    return found


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class CpuMeter:
    """CPU seconds spent between `start` and `stop`, by named process tree."""

    pids: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)
    _started: float = 0.0

    def _read(self) -> dict[str, float]:
        now = {name: _tree_seconds(pid) for name, pid in self.pids.items()}
        now["rabbitmq"] = sum(_tree_seconds(pid) for pid in _broker_pids())
        own = psutil.Process(os.getpid()).cpu_times()
        now["bench client"] = own.user + own.system
        now["machine"] = _machine_busy()
        return now

    def start(self) -> CpuMeter:
        """Take the first reading."""
        self._before = self._read()
        self._started = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds per tree since `start`, plus `other` (the rest of the machine) and
        `capacity` (cores times wall seconds)."""
        after = self._read()
        spent = {name: after[name] - self._before[name] for name in after}
        machine = spent.pop("machine")
        self.seconds = {name: round(s, 1) for name, s in spent.items()}
        self.seconds["other processes"] = round(machine - sum(spent.values()), 1)
        cores = len(os.sched_getaffinity(0))
        self.seconds["capacity"] = round(cores * (time.monotonic() - self._started), 1)
        return self.seconds


def ours() -> float:
    """CPU seconds of this process and every descendant, live or already reaped."""
    me = psutil.Process(os.getpid())
    times = me.cpu_times()
    # Reaped children (stopped pipelines, workers) are counted in children_user/system.
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return float(total)


@dataclass
class PhaseMeter:
    """CPU seconds of the whole benchmark and of the rest of the machine during one phase."""

    _ours: float = 0.0
    _machine: float = 0.0
    _started: float = 0.0

    def start(self) -> PhaseMeter:
        """Take the first reading."""
        self._ours, self._machine, self._started = ours(), _machine_busy(), time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        """`benchmark`, `other processes` and `capacity` CPU seconds since `start`."""
        spent = ours() - self._ours
        machine = _machine_busy() - self._machine
        cores = len(os.sched_getaffinity(0))
        return {
            "benchmark": round(spent, 1),
            "other processes": round(max(0.0, machine - spent), 1),
            "capacity": round(cores * (time.monotonic() - self._started), 1),
        }
