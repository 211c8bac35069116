"""A job's place in the queue and how long until it ends, from one snapshot of the jobs that
have not ended. Pure, but for the small cache that keeps one snapshot per store.

Why a snapshot: a listing of 50 jobs would otherwise cost 50 counts, each over every job
waiting; one read of the waiting jobs (kept up to a second) answers them all with a binary
search each, and stays cheap with thousands waiting.

How the numbers are estimated (both are per lane: interactive and bulk work do not wait for
each other; with lanes off there is one lane):

- An admitted job's `position` is how many documents of its lane entered its current stage
  before it (same status, earlier `stage_since`) and have not ended; 0 once that stage has
  started on it.
- A held job (waiting in the store for its turn, gateway/store/fair_share.py) counts the
  lane's admitted jobs still waiting for the first stage, plus the held jobs fair admission
  takes before it. Admission alternates between collections, so if it is `r`-th among its
  collection's held jobs (from 0), about `r` jobs of every other collection go first, or all
  of a collection that has fewer: `r + Σ_other min(held_c, r)`.
- `eta_s` is (the jobs of its lane ahead of it anywhere in the pipeline + 1), divided by how
  many jobs of that lane ended per second over the last minute; null when none did. The
  minute counts from the first of those ends (at least `MIN_RATE_SPAN_S` back), so the
  first seconds of an import are not measured as a mostly idle minute.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate

from contracts.pipeline import QUEUED, Pipeline
from gateway.http.schemas import Job, QueuePlace
from gateway.store.states import TERMINAL, stage_of_status

# The window the drain rate is measured over, and the shortest span it is divided by (a
# handful of ends moments apart is not a rate of thousands a minute).
RATE_WINDOW_S = 60.0
MIN_RATE_SPAN_S = 10.0
# The lane of every job while lanes are off: one FIFO.
_ONE_LANE = "all"


@dataclass(frozen=True)
class Ended:
    """How many jobs of a lane ended in the last minute, and how long ago the first did."""

    jobs: int
    span_s: float


@dataclass(frozen=True)
class Waiting:
    """A job that has not ended, as the snapshot needs it."""

    job_id: str
    priority: str
    collection: str
    status: str
    # When its status last changed (its place in its stage's line).
    since: datetime
    created_at: datetime
    admitted: bool
    # Whether it is its document's current version (a held job of a replaced or deleted
    # document is never admitted, so it waits for nothing and holds no one up).
    current: bool
    confirmed: bool


class QueueSnapshot:
    """The jobs that had not ended at one moment, indexed for the estimates above."""

    def __init__(
        self,
        waiting: Iterable[Waiting],
        ended_last_minute: Mapping[str, Ended],
        *,
        pipeline: Pipeline,
        lanes: bool,
    ) -> None:
        self.pipeline = pipeline
        self.lanes = lanes
        self._order = {status: n for n, status in enumerate(pipeline.statuses)}
        self._ended: Counter[str] = Counter()
        span: defaultdict[str, float] = defaultdict(float)
        for priority, ended in ended_last_minute.items():
            lane = self._lane(priority)
            self._ended[lane] += ended.jobs
            span[lane] = max(span[lane], ended.span_s)
        # Jobs of each lane that end per second, as last measured.
        self._rate = {
            lane: n / min(RATE_WINDOW_S, max(MIN_RATE_SPAN_S, span[lane]))
            for lane, n in self._ended.items()
            if n
        }
        in_status: defaultdict[tuple[str, str], list[tuple[datetime, str]]] = defaultdict(list)
        by_order: defaultdict[str, Counter[int]] = defaultdict(Counter)
        held: defaultdict[tuple[str, str], list[tuple[datetime, str]]] = defaultdict(list)
        self._orphans: set[str] = set()
        for job in waiting:
            lane = self._lane(job.priority)
            if job.admitted and (job.confirmed or job.current):
                in_status[lane, job.status].append((job.since, job.job_id))
                by_order[lane][self._order.get(job.status, 0)] += 1
            elif not job.admitted and job.current:
                held[lane, job.collection].append((job.created_at, job.job_id))
            elif not job.admitted:
                self._orphans.add(job.job_id)
        self._in_status = {key: sorted(line) for key, line in in_status.items()}
        self._held = {key: sorted(line) for key, line in held.items()}
        # Per lane: admitted jobs at each status index or later, for "ahead anywhere".
        self._at_or_after: dict[str, list[int]] = {}
        for lane, counts in by_order.items():
            per_index = [counts[n] for n in range(len(self._order))]
            self._at_or_after[lane] = [*reversed(list(accumulate(reversed(per_index)))), 0]
        # Per lane: every collection's held count, sorted, with prefix sums, for Σ min(h, r).
        sizes: defaultdict[str, list[int]] = defaultdict(list)
        for (lane, _), line in self._held.items():
            sizes[lane].append(len(line))
        self._held_sizes = {lane: sorted(s) for lane, s in sizes.items()}
        self._held_prefix = {lane: [0, *accumulate(s)] for lane, s in self._held_sizes.items()}

    def _lane(self, priority: str) -> str:
        return priority if self.lanes else _ONE_LANE

    def place(self, job: Job, since: datetime | None) -> QueuePlace:
        """Where `job` (as it is now; `since`: its `stage_since`) waits, and its ETA."""
        if job.status in TERMINAL or job.job_id in self._orphans:
            return QueuePlace()
        lane = self._lane(job.priority)
        if job.admitted_at is None:
            line = self._held.get((lane, job.collection), [])
            rank = bisect.bisect_left(line, (job.created_at, job.job_id))
            others = self._sum_min(lane, rank) - min(len(line), rank)
            admitted = self._at_or_after.get(lane, [0])[0]
            position = self._waiting_for_first(lane) + rank + others
            ahead = admitted + rank + others
        else:
            order = self._order.get(job.status, 0)
            line = self._in_status.get((lane, job.status), [])
            before = bisect.bisect_left(line, (since, job.job_id)) if since else 0
            position = 0 if self._started(job) else before
            later = self._at_or_after.get(lane)
            ahead = before + (later[order + 1] if later and order + 1 < len(later) else 0)
        rate = self._rate.get(lane)
        eta_s = round((ahead + 1) / rate, 1) if rate else None
        return QueuePlace(position=position, eta_s=eta_s)

    def _waiting_for_first(self, lane: str) -> int:
        """Admitted jobs of the lane still waiting for the first stage (status queued)."""
        return len(self._in_status.get((lane, QUEUED), []))

    def _sum_min(self, lane: str, rank: int) -> int:
        """Σ over the lane's collections of min(held jobs, rank)."""
        sizes = self._held_sizes.get(lane, [])
        prefix = self._held_prefix.get(lane, [0])
        below = bisect.bisect_left(sizes, rank)  # collections holding fewer than `rank`
        return prefix[below] + rank * (len(sizes) - below)

    def _started(self, job: Job) -> bool:
        """Whether the stage the job's status names has begun work on it."""
        stage = stage_of_status(self.pipeline, job.status)
        timing = job.stages.get(stage) if stage else None
        return timing is not None and timing.started_at is not None


class QueueSnapshots:
    """One store's snapshot, taken again once older than `max_age_s`.

    No lock is held while one is taken: two threads that find it stale at once both read,
    which costs a read and can never deadlock with the store's own lock.
    """

    def __init__(self, take: Callable[[], QueueSnapshot], max_age_s: float = 1.0) -> None:
        self._take = take
        self.max_age_s = max_age_s
        self._kept: tuple[float, QueueSnapshot] | None = None

    def current(self) -> QueueSnapshot:
        """A snapshot at most `max_age_s` old."""
        kept = self._kept
        now = time.monotonic()
        if kept is not None and now - kept[0] < self.max_age_s:
            return kept[1]
        snapshot = self._take()
        self._kept = (now, snapshot)
        return snapshot
