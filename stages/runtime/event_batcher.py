"""Group commit for progress events: one confirmed message for every event ready at once.

Each finished delivery's ack waits for its progress event to be confirmed (a job's status is
right after any crash), but the events need not each be a message of their own. The first
event starts a flush; those that arrive while it is in flight wait, and the next flush sends
them all as one `JobEvents` message (contracts/events.py). No timer: an idle stage sends its
event at once, and a busy one sends one message per many data messages, its acks delayed by
at most the round trip of the flush before. A flush that fails fails each of its events'
publishes, which the settler decides on as before (stages/runtime/settle.py).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

from contracts.errors import Transient
from contracts.events import MAX_EVENTS_PER_MESSAGE, JobEvent, JobEvents
from stages.runtime.ports import BrokerPort


class EventBatcher:
    """Publishes one stage process's progress events, together when they come together."""

    def __init__(self, broker: BrokerPort, stage: str) -> None:
        self.broker = broker
        self.stage = stage
        self._waiting: list[tuple[JobEvent, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        # Events published and the messages that carried them, since the process started.
        self.events = 0
        self.messages = 0

    async def publish(self, events: Sequence[JobEvent]) -> None:
        """Returns once the messages carrying `events` are confirmed; raises what a publish
        of theirs raised. One delivery's events go in one message unless they straddle
        `MAX_EVENTS_PER_MESSAGE`."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        confirmed = [loop.create_future() for _ in events]
        self._waiting.extend(zip(events, confirmed, strict=True))
        if self._flushing is None:
            # A context of its own: the message is no one delivery's (trace, log fields).
            self._flushing = asyncio.create_task(
                self._flush_while_waiting(), context=contextvars.Context()
            )
        await asyncio.gather(*confirmed)

    async def _flush_while_waiting(self) -> None:
        try:
            # Deliveries settled in this same turn of the loop go in the first message too.
            await asyncio.sleep(0)
            while self._waiting:
                batch = self._waiting[:MAX_EVENTS_PER_MESSAGE]
                del self._waiting[:MAX_EVENTS_PER_MESSAGE]
                await self._flush(batch)
        finally:
            self._flushing = None
            # Cancelled (the loop is closing): nothing will send what still waits.
            left, self._waiting = self._waiting, []
            _fail(left, _CANCELLED)

    async def _flush(self, batch: list[tuple[JobEvent, asyncio.Future[None]]]) -> None:
        events = [event for event, _ in batch]
        try:
            if len(events) == 1:
                await self.broker.publish(events[0])
            else:
                await self.broker.publish(JobEvents(stage=self.stage, events=events))
        except BaseException as exc:
            _fail(batch, exc if isinstance(exc, Exception) else _CANCELLED)
            if not isinstance(exc, Exception):
                raise
            return
        self.events += len(events)
        self.messages += 1
        for _, confirmed in batch:
            if not confirmed.done():
                confirmed.set_result(None)


def _fail(waiting: list[tuple[JobEvent, asyncio.Future[None]]], error: Exception) -> None:
    """Fail the publishes of `waiting`; their deliveries are settled as failed publishes."""
    for _, confirmed in waiting:
        # A waiter cancelled meanwhile (a drain's deadline) wants no answer.
        if not confirmed.done():
            confirmed.set_exception(error)


# What a publish is told when its flush was cancelled: redelivered, like any failed publish.
_CANCELLED = Transient("the progress events were not published: their flush was cancelled")
