"""Which waiting delivery gets a stage's next free worker slot: interactive first, bulk its share.

A stage consumes both lanes' queues, each with its own prefetch, so deliveries of both lanes
wait in hand for one of the stage's `concurrency` slots. RabbitMQ cannot choose for us: 3.10's
quorum queues have no message priorities, and global QoS is refused on them. So the choice is
made here, at the moment a slot frees up:

- only one lane waits: it gets the slot;
- both wait: interactive gets it, except that every such grant earns bulk `bulk_share` of a
  credit, and a whole credit buys bulk the slot. A counter, not a coin: bulk gets exactly its
  share of the contested grants (one in five at 0.2), however long interactive work keeps
  arriving, so an import always progresses;
- `reserved` slots are never given to bulk: a stage whose slots are held while work waits
  in a shared call (embed's model calls, index's shared writes) would otherwise have every
  slot held by a bulk import for a whole call, and an interactive delivery could not even
  begin. The runner reserves a quarter of a stage's slots (none for a stage of fewer than
  four, whose slots are the work itself);
- lanes off (`SLUICE_LANES=false`): the delivery that has waited longest, whatever its lane.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction

from contracts.routing import BULK, INTERACTIVE, LANES, Lane


@dataclass
class _Waiter:
    arrived: int
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class LaneGate:
    """Hands out `slots` concurrent slots to deliveries of both lanes (see the module)."""

    def __init__(
        self,
        slots: int,
        *,
        bulk_share: float,
        prefer_interactive: bool = True,
        reserved: int = 0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a lane gate needs at least one slot, not {slots}")
        if not 0 <= reserved < slots:
            raise ValueError(f"reserve 0 to {slots - 1} of {slots} slots, not {reserved}")
        self.slots = slots
        self.prefer_interactive = prefer_interactive
        self.reserved = reserved
        self._held: dict[Lane, int] = dict.fromkeys(LANES, 0)
        # Exact arithmetic: 0.2 five times must make one whole credit, not 0.99999.
        self._share = Fraction(bulk_share).limit_denominator(1000)
        self._credit = Fraction(0)
        self._free = slots
        self._waiting: dict[Lane, deque[_Waiter]] = {lane: deque() for lane in LANES}
        self._arrivals = itertools.count()

    def waiting(self, lane: Lane) -> int:
        """How many deliveries of `lane` wait for a slot."""
        return sum(1 for w in self._waiting[lane] if not w.granted.done())

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self.slots - self._free

    @asynccontextmanager
    async def slot(self, lane: Lane) -> AsyncIterator[None]:
        """Hold one slot for a delivery of `lane` for the duration of the block."""
        await self.acquire(lane)
        try:
            yield
        finally:
            self.release(lane)

    async def acquire(self, lane: Lane) -> None:
        """Wait until this delivery of `lane` is granted a slot."""
        waiter = _Waiter(next(self._arrivals))
        self._waiting[lane].append(waiter)
        # With a slot free nobody else waits (grants happen at once): this one gets it now.
        self._grant()
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted in the same turn it was cancelled: the slot goes to the next one.
                self.release(lane)
            elif waiter in self._waiting[lane]:
                self._waiting[lane].remove(waiter)
            raise

    def release(self, lane: Lane) -> None:
        """Give back a slot `lane` held; it goes to the next delivery the rules pick."""
        self._free += 1
        self._held[lane] -= 1
        self._grant()

    def _grant(self) -> None:
        while self._free > 0:
            lane = self._next_lane(bulk_may=self._held[BULK] < self.slots - self.reserved)
            if lane is None:
                return
            waiter = self._waiting[lane].popleft()
            self._free -= 1
            self._held[lane] += 1
            waiter.granted.set_result(None)

    def _next_lane(self, *, bulk_may: bool) -> Lane | None:
        """The lane of the next grant, or None when nobody waits (or only bulk, which may
        not take a reserved slot)."""
        for queue in self._waiting.values():
            # A waiter cancelled while waiting leaves before its task runs again.
            while queue and queue[0].granted.done():
                queue.popleft()
        interactive, bulk = self._waiting[INTERACTIVE], self._waiting[BULK]
        if not bulk:
            # Credit is earned only while bulk waits: an absent lane banks nothing.
            self._credit = Fraction(0)
            return INTERACTIVE if interactive else None
        if not bulk_may:
            return INTERACTIVE if interactive else None
        if not interactive:
            return BULK
        if not self.prefer_interactive:
            return INTERACTIVE if interactive[0].arrived < bulk[0].arrived else BULK
        self._credit += self._share
        if self._credit >= 1:
            self._credit -= 1
            return BULK
        return INTERACTIVE
