"""Fair share between collections: which held jobs to admit into the pipeline next. Pure.

FIFO broker queues cannot be fair between tenants: a collection that uploads 10,000
documents first would hold every other collection behind them. So the backlog waits in the
job store, and jobs are admitted a few at a time: while the lane has room, the next one
comes from the collection with the fewest jobs of that lane in flight (ties: the one whose
oldest held job is oldest), and within a collection the oldest held job goes first. A
collection that just arrived has none in flight, so its first document goes next, however
long another collection's backlog is.

The lanes' room: bulk jobs share `bulk_in_flight` slots between every collection;
interactive jobs are held only past `interactive_per_collection` in flight in their own
collection, so one tenant's flood of interactive uploads cannot hold another's.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from contracts.routing import BULK, INTERACTIVE, Lane
from gateway.store.base import Admission


@dataclass(frozen=True)
class Held:
    """A job recorded but not yet admitted."""

    job_id: str
    priority: Lane
    collection: str
    created_at: datetime


def admission_order(
    held: Sequence[Held],
    in_flight: Mapping[tuple[Lane, str], int],
    policy: Admission,
    limit: int,
) -> list[Held]:
    """The held jobs to admit now, in the order to admit them: interactive ones first (each
    collection up to its cap), then bulk ones (up to the cap of all collections together).

    `in_flight` counts each (lane, collection)'s admitted jobs that have not ended. With
    lanes off there is no cap and no order but age: everything held is admitted.
    """
    oldest_first = sorted(held, key=lambda h: (h.created_at, h.job_id))
    if not policy.lanes:
        return oldest_first[:limit]
    chosen = _fairly(
        [h for h in oldest_first if h.priority == INTERACTIVE],
        {c: n for (lane, c), n in in_flight.items() if lane == INTERACTIVE},
        per_collection=policy.interactive_per_collection,
        total=None,
        limit=limit,
    )
    bulk_in_flight = sum(n for (lane, _), n in in_flight.items() if lane == BULK)
    chosen += _fairly(
        [h for h in oldest_first if h.priority == BULK],
        {c: n for (lane, c), n in in_flight.items() if lane == BULK},
        per_collection=None,
        total=policy.bulk_in_flight - bulk_in_flight,
        limit=limit - len(chosen),
    )
    return chosen


def _fairly(
    held: list[Held],
    in_flight: dict[str, int],
    *,
    per_collection: int | None,
    total: int | None,
    limit: int,
) -> list[Held]:
    """Up to `limit` (and `total`) of one lane's held jobs (oldest first), each taken from
    the collection with the fewest in flight, no collection past `per_collection`."""
    waiting: defaultdict[str, deque[Held]] = defaultdict(deque)
    for job in held:
        waiting[job.collection].append(job)
    counts = dict(in_flight)

    def entry(collection: str) -> tuple[int, datetime, str, str]:
        head = waiting[collection][0]
        return (counts.get(collection, 0), head.created_at, head.job_id, collection)

    def has_room(collection: str) -> bool:
        return per_collection is None or counts.get(collection, 0) < per_collection

    turns = [entry(c) for c in waiting if has_room(c)]
    heapq.heapify(turns)
    room = limit if total is None else min(limit, total)
    chosen: list[Held] = []
    while turns and len(chosen) < room:
        *_, collection = heapq.heappop(turns)
        chosen.append(waiting[collection].popleft())
        counts[collection] = counts.get(collection, 0) + 1
        if waiting[collection] and has_room(collection):
            heapq.heappush(turns, entry(collection))
    return chosen
