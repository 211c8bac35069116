"""A stage process says what it is doing every few seconds: its worker heartbeat.

Every `SLUICE_HEARTBEAT_EVERY_S` the runner publishes a `WorkerHeartbeat` (contracts/events.py)
to `worker.<stage>` on the main exchange, for the gateways' `GET /v1/pipeline` and
`sluice status`: who it is, how much it settled, what it holds per lane and for which jobs.
A heartbeat is best effort: with no gateway listening the broker returns it unroutable, and
with the broker away it fails; either is logged at debug and the stage carries on. A clean
stop sends one last heartbeat with `stopping=True`, so the gateway forgets the worker instead
of calling it dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache

from contracts.events import WorkerHeartbeat
from contracts.routing import LANES, Lane
from stages.runtime.outcome import DeadLetter, Done, Outcome
from stages.runtime.ports import BrokerPort

log = logging.getLogger(__name__)
# A heartbeat names at most this many jobs in hand: enough to find a stuck one, never a big
# message however large an operator sets the prefetch.
MAX_JOBS_NAMED = 100


@cache
def sluice_version() -> str:
    """The installed Sluice's version, or "unknown" when running from a bare checkout."""
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class WorkerStats:
    """What one stage process has settled since it started, and what it holds right now."""

    def __init__(self) -> None:
        self.processed = 0
        self.failed = 0
        self._lanes: Counter[Lane] = Counter()
        self._jobs: Counter[str] = Counter()
        self._held = 0
        # Seconds with at least one delivery in hand, up to `_busy_since` (when the process
        # last went from idle to busy; None while idle).
        self._busy_s = 0.0
        self._busy_since: float | None = None

    @contextmanager
    def holding(self, lane: Lane, job_id: str | None) -> Iterator[None]:
        """Count a delivery of `lane` as in hand (taken, not yet settled) for the block."""
        self._lanes[lane] += 1
        self._held += 1
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        if job_id:
            self._jobs[job_id] += 1
        try:
            yield
        finally:
            self._lanes[lane] -= 1
            self._held -= 1
            if self._held == 0 and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None
            if job_id:
                self._jobs[job_id] -= 1
                if self._jobs[job_id] <= 0:
                    del self._jobs[job_id]

    @property
    def busy_s(self) -> float:
        """Seconds since the start with at least one delivery in hand (overlaps count once)."""
        running = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_s + running

    def settled(self, outcome: Outcome) -> None:
        """Count how a delivery ended: done, or dead-lettered (retries and requeues are
        neither: the message comes back)."""
        if isinstance(outcome, Done):
            self.processed += 1
        elif isinstance(outcome, DeadLetter):
            self.failed += 1

    @property
    def in_hand(self) -> dict[str, int]:
        """Deliveries in hand per lane (every lane named, zero or not)."""
        return {lane: self._lanes[lane] for lane in LANES}

    @property
    def jobs(self) -> list[str]:
        """The jobs of the deliveries in hand, in the order they were taken."""
        return list(self._jobs)[:MAX_JOBS_NAMED]


class Heartbeat:
    """Publishes one stage process's heartbeats from its `WorkerStats`."""

    def __init__(
        self, broker: BrokerPort, stage: str, stats: WorkerStats, *, every_s: float
    ) -> None:
        self.broker = broker
        self.stage = stage
        self.stats = stats
        self.every_s = every_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # The random part tells apart two processes that got the same pid (containers).
        self.worker_id = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self.started_at = datetime.now(UTC)
        # What the last summary line had counted (processed, failed, busy seconds).
        self._summarised = (0, 0, 0.0)

    def beat(self, *, stopping: bool = False) -> WorkerHeartbeat:
        """The heartbeat as of now."""
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            stage=self.stage,
            host=self.host,
            pid=self.pid,
            sluice_version=sluice_version(),
            started_at=self.started_at,
            every_s=self.every_s,
            processed=self.stats.processed,
            failed=self.stats.failed,
            in_hand=self.stats.in_hand,
            in_hand_jobs=self.stats.jobs,
            stopping=stopping,
        )

    async def send(self, *, stopping: bool = False) -> bool:
        """Publish one heartbeat; returns whether the broker took it. Never raises."""
        try:
            await self.broker.publish(self.beat(stopping=stopping))
        except Exception as exc:
            # Nobody listening (unroutable) or the broker away: the stage's work goes on.
            log.debug("%s: heartbeat not sent: %s", self.stage, exc)
            return False
        return True

    def summarise(self) -> None:
        """One INFO line on what was settled since the last one, if anything was: the stage's
        log says how busy it is without a line per message (those are at DEBUG).
        bench/sluice_run.py adds up the "busy <seconds> s" of these lines."""
        now = (self.stats.processed, self.stats.failed, self.stats.busy_s)
        done, failed, busy = (a - b for a, b in zip(now, self._summarised, strict=True))
        if done or failed:
            log.info(
                "%s: %d done, %d failed since the last summary; busy %.2f s",
                self.stage,
                done,
                failed,
                busy,
            )
            self._summarised = now

    async def run(self) -> None:
        """Send a heartbeat every `every_s` until cancelled (the first one at once), and log
        a summary with each."""
        while True:
            await self.send()
            self.summarise()
            await asyncio.sleep(self.every_s)

    async def last(self) -> None:
        """The last summary, and the stopping heartbeat, waited for no longer than one
        interval."""
        self.summarise()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.send(stopping=True), self.every_s)
