"""The stage runtime: consume, validate, call the handler, then settle the delivery once.

Each delivery is read (stages/runtime/reading.py), decided (stages/runtime/outcome.py: the
whole table of how a delivery can end) and settled (stages/runtime/settle.py: the one place
that publishes, acks and nacks), inside layers for the concerns around it: crash guard, log
context, tracing, metrics (stages/runtime/layers.py). In short:
- handler returned → outputs and the progress event published, both confirmed → ack (a
  handler that takes longer than `announce.ANNOUNCE_AFTER_S` also announces a `started` event);
- `Permanent`, a message that does not validate, or outputs that break the stage contract →
  copy to the dead-letter exchange with the reason in headers → `failed` event → ack;
- `Transient` → a few short in-process retries first (jittered, never long enough to hold a
  message near the consumer timeout);
- anything still failing → republished to the stage's retry tier for its attempt (a TTL queue
  that dead-letters back), ack; after `max_attempts` it is dead-lettered as retryable.
A worker that dies mid-message never acks it: RabbitMQ redelivers it with `x-delivery-count`.
One that has been delivered `delivery_limit` times already is set aside as `worker_crashed`
before it can kill another worker; the quorum queue's own delivery limit is the backstop.

The runner consumes both lanes' queues of its stage (contracts/routing.py), each with the
stage's prefetch, and its `concurrency` slots go to waiting deliveries through a `LaneGate`
(stages/runtime/lanes.py): interactive first, bulk its guaranteed share. Every few seconds
it publishes the process's heartbeat (stages/runtime/heartbeat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from contracts import routing
from contracts.errors import Transient
from contracts.messages import Message
from contracts.settings import Settings
from stages.runtime.announce import Announcer
from stages.runtime.heartbeat import Heartbeat, WorkerStats
from stages.runtime.lanes import LaneGate
from stages.runtime.layers import CrashGuard, Layer, LogContext, Metrics, Tracing, wrap
from stages.runtime.outcome import Ended, Outcome, Raised, Returned, decide, refuse
from stages.runtime.ports import BrokerPort, Consuming, Delivery, OnDelivery
from stages.runtime.reading import DeliveryContext, read_delivery
from stages.runtime.settle import Settler
from stages.stage import Stage

log = logging.getLogger(__name__)


class StageRunner:
    """Runs one stage's consumer until asked to stop, then drains in-flight work.

    `layers` are extra concerns, run inside the default ones (so the crash guard covers them).
    """

    # Between in-process retries of `Transient`: jittered, and short next to consumer timeouts.
    transient_wait: wait_base = wait_random_exponential(multiplier=0.2, max=2.0)

    def __init__(
        self,
        stage: Stage[Any, Any],
        ctx: Any,
        settings: Settings,
        broker: BrokerPort,
        *,
        layers: Sequence[Layer] = (),
    ) -> None:
        self.stage = stage
        self.ctx = ctx
        self.settings = settings
        self.broker = broker
        self.queues: dict[routing.Lane, str] = {
            lane: routing.stage_queue(settings.namespace, stage.name, lane)
            for lane in routing.LANES
        }
        self.queue_name = self.queues[routing.INTERACTIVE]
        self.tuned = settings.stage(stage.name)
        self.output_key = settings.pipeline.output_key(stage.name)
        self.settler = Settler(broker, settings, stage.name)
        self.announcer = Announcer(broker, stage.name)
        self.layers: tuple[Layer, ...] = (
            CrashGuard(self.settler.settle),
            LogContext(),
            Tracing(),
            Metrics(),
            *layers,
        )
        self._handling = wrap(self.layers, self._decide_and_settle)
        # Lanes off: one FIFO, as before lanes (leftovers in a bulk queue are still served).
        self.gate = LaneGate(
            self.tuned.concurrency,
            bulk_share=settings.bulk_share,
            prefer_interactive=settings.lanes,
            # Kept free of bulk, so interactive work can always begin (stages/runtime/lanes.py).
            reserved=self.tuned.concurrency // 4 if settings.lanes else 0,
        )
        self.stats = WorkerStats()
        self.heartbeat = Heartbeat(
            broker, stage.name, self.stats, every_s=settings.heartbeat_every_s
        )
        self._in_flight: set[asyncio.Task[Any]] = set()

    async def run(self, stop: asyncio.Event, *, drain_timeout_s: float = 30.0) -> None:
        """Consume until `stop` is set; then stop taking messages and finish those in hand."""
        consumers: list[Consuming] = []
        beating = asyncio.create_task(self.heartbeat.run())
        try:
            for lane, queue in self.queues.items():
                consumers.append(
                    await self.broker.consume(queue, self.tuned.prefetch, self._receiver(lane))
                )
            log.info("stage %s consuming %s", self.stage.name, ", ".join(self.queues.values()))
            await stop.wait()
            for consumer in consumers:
                await consumer.cancel()
            if self._in_flight:
                log.info(
                    "stage %s finishing %d in-flight messages",
                    self.stage.name,
                    len(self._in_flight),
                )
                _, pending = await asyncio.wait(self._in_flight, timeout=drain_timeout_s)
                # Unfinished work is not acked: closing the consumer hands it back to the queue.
                for task in pending:
                    task.cancel()
            for consumer in consumers:
                await consumer.close()
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await self.heartbeat.last()

    def _receiver(self, lane: routing.Lane) -> OnDelivery:
        """The consumer callback of one lane's queue."""

        async def on_message(delivery: Delivery) -> None:
            await self._on_message(lane, delivery)

        return on_message

    async def _on_message(self, lane: routing.Lane, delivery: Delivery) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            ctx = self._read(delivery, lane)
            with self.stats.holding(lane, ctx.job_id):
                async with self.gate.slot(lane):
                    # The handler's time starts now, not while it waited for a slot.
                    ctx.started_s = time.perf_counter()
                    outcome = await self._handling(ctx)
                self.stats.settled(outcome)
        finally:
            self._in_flight.discard(task)

    async def process(
        self, delivery: Delivery, lane: routing.Lane = routing.INTERACTIVE
    ) -> Outcome:
        """Handle one delivery of `lane` to its end (ack, retry tier, dead letter or requeue)
        at once, without waiting for a slot; returns how it was settled."""
        return await self._handling(self._read(delivery, lane))

    def _read(self, delivery: Delivery, lane: routing.Lane) -> DeliveryContext:
        return read_delivery(delivery, self.stage.name, self.queues[lane], self.stage.input, lane)

    async def _decide_and_settle(self, ctx: DeliveryContext) -> Outcome:
        """What the layers wrap: decide how the delivery ends, then settle it."""
        outcome: Outcome | None = refuse(ctx, self.tuned)
        if outcome is None:
            assert ctx.msg is not None
            ended = await self._run(ctx.msg, ctx.attempt)
            outcome = decide(ctx, ended, self.stage.spec, self.tuned)
        return await self.settler.settle(ctx, outcome)

    async def _run(self, msg: Message, attempt: int) -> Ended:
        """How the stage's handler ended on `msg`, announcing `started` if it takes a while."""
        with self.announcer.announcing(msg, attempt):
            try:
                return Returned(await self._handle(msg))
            except Exception as exc:
                return Raised(exc)

    async def _handle(self, msg: Message) -> Sequence[Message]:
        """The stage's handler, with short jittered retries of transient errors in-process."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.tuned.transient_retries + 1),
            wait=self.transient_wait,
            reraise=True,
        )
        outputs: Sequence[Message] = []
        async for attempt in retrying:
            with attempt:
                outputs = await self.stage.handle(msg, self.ctx)
        return outputs
