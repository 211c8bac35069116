"""`started` events for work a person could watch, sent only when the work takes a while."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from contracts import events
from contracts.messages import Message
from stages.runtime.ports import BrokerPort

log = logging.getLogger(__name__)
# A handler still busy after this long announces that its stage started on the job.
ANNOUNCE_AFTER_S = 0.5


class Announcer:
    """Publishes a stage's `started` events without waiting for their confirms."""

    def __init__(self, broker: BrokerPort, stage: str, after_s: float = ANNOUNCE_AFTER_S) -> None:
        self.broker = broker
        self.stage = stage
        self.after_s = after_s
        # Held so a send in flight is not garbage-collected before it finishes.
        self._sending: set[asyncio.Task[None]] = set()

    @contextmanager
    def announcing(self, msg: Message, attempt: int) -> Iterator[None]:
        """Announce `started` for `msg` if the block is still running after `after_s`.

        Only a document's first unit gets one: a handler done sooner says so with its
        progress event alone, one broker message fewer.
        """
        if msg.unit()[0] != 0:
            yield
            return
        event = events.started(self.stage, msg, attempt)
        timer = asyncio.get_running_loop().call_later(self.after_s, self._send, event)
        try:
            yield
        finally:
            timer.cancel()

    def _send(self, event: events.JobEvent) -> None:
        # Not awaited by the handler: a lost `started` loses nothing (progress moves the job
        # on too), so the handler does not wait a round trip for its confirm.
        task = asyncio.create_task(self.broker.publish(event))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s: a started event was not published: %s", self.stage, exc)
