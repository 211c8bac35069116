"""A stage's consumers, one per lane's queue, taken on, paused and resumed together.

The runner pauses them to run a redelivered message alone (stages/runtime/isolation.py) and
to drain when it stops. A paused consumer keeps its channel: the deliveries it handed over are
still settled on it, and it is closed only once they are (closing it with one unsettled would
hand that one back, counted as a failed delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from contracts.routing import Lane
from stages.runtime.ports import BrokerPort, Consuming, OnDelivery

log = logging.getLogger(__name__)


class Consumers:
    """The consumers of one stage process, each of its lanes' queues with the stage's prefetch."""

    def __init__(
        self,
        broker: BrokerPort,
        stage: str,
        queues: Mapping[Lane, str],
        prefetch: int,
        receiver: Callable[[Lane], OnDelivery],
    ) -> None:
        self.broker = broker
        self.stage = stage
        self.queues = queues
        self.prefetch = prefetch
        self.receiver = receiver
        # Once set, nothing consumes again: the stage is draining.
        self.stopping = False
        self._active: list[Consuming] = []
        self._paused: list[Consuming] = []
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Take deliveries from every lane's queue."""
        async with self._lock:
            for lane, queue in self.queues.items():
                self._active.append(
                    await self.broker.consume(queue, self.prefetch, self.receiver(lane))
                )

    async def pause(self) -> None:
        """Take no more deliveries (those in hand may still be settled)."""
        async with self._lock:
            while self._active:
                consumer = self._active.pop()
                self._paused.append(consumer)
                try:
                    await consumer.cancel()
                except Exception as exc:
                    # The channel is gone (the broker away): it delivers nothing more anyway.
                    log.warning("stage %s: a consumer did not cancel: %s", self.stage, exc)

    async def fence(self) -> None:
        """Return once the broker has taken every ack sent on the paused consumers.

        An ack is not answered, and the client writes it from a queue: a worker killed right
        after it acked may not have written the acks yet, and the deliveries they settled
        would be handed back, counted, beside the one that killed it. A round trip on each
        channel (a second cancel, which RabbitMQ answers whatever the tag) comes back only
        once the frames sent before it were handled.
        """
        async with self._lock:
            for consumer in self._paused:
                try:
                    await consumer.cancel()
                except Exception as exc:
                    log.warning("stage %s: a channel did not answer: %s", self.stage, exc)

    async def resume(self) -> None:
        """Consume again on fresh consumers, once the paused ones have nothing unsettled;
        retried until it works (a stage must not go deaf) or the stage stops."""
        delay_s = 0.5
        while not self.stopping:
            async with self._lock:
                while self._paused:
                    with contextlib.suppress(Exception):
                        await self._paused.pop().close()
            try:
                await self.start()
                return
            except Exception as exc:
                log.warning(
                    "stage %s could not consume again (%s); retrying in %.1fs",
                    self.stage,
                    exc,
                    delay_s,
                )
                await self.pause()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def stop(self) -> None:
        """Take no more deliveries, for good."""
        self.stopping = True
        await self.pause()

    async def close(self) -> None:
        """Release every consumer: what is still unsettled goes back to its queue."""
        async with self._lock:
            for consumer in (*self._active, *self._paused):
                await consumer.close()
            self._active.clear()
            self._paused.clear()
