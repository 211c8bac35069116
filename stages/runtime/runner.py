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
A redelivered message runs alone, with nothing else in hand, so a message that kills its
worker takes no other down with it (stages/runtime/isolation.py); one that has been handed
back `delivery_limit` times already is set aside as `worker_crashed` before it can kill
another worker; the quorum queue's own delivery limit is the backstop.

The runner consumes both lanes' queues of its stage (contracts/routing.py), each with the
stage's prefetch, and its `concurrency` slots go to waiting deliveries through a `LaneGate`
(stages/runtime/lanes.py): interactive first, bulk its guaranteed share. A slot is held by
the handler only, not while its outputs are confirmed. Every few seconds
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
from stages.runtime.consumers import Consumers
from stages.runtime.heartbeat import Heartbeat, WorkerStats
from stages.runtime.lanes import LaneGate
from stages.runtime.layers import CrashGuard, Layer, LogContext, Metrics, Tracing, wrap
from stages.runtime.outcome import Ended, Outcome, Park, Raised, Returned, decide, refuse
from stages.runtime.ports import BrokerPort, Delivery, OnDelivery
from stages.runtime.reading import DeliveryContext, read_delivery
from stages.runtime.settle import Settler
from stages.stage import Stage

log = logging.getLogger(__name__)
# Turns of the event loop that deliveries already received need to reach the runner.
_TURNS = 5


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
        self.consumers = Consumers(
            broker, stage.name, self.queues, self.tuned.prefetch, self._receiver
        )
        # The delivery that runs alone, or waits to (stages/runtime/isolation.py); set while no
        # consumer takes deliveries for it any more.
        self._alone: asyncio.Task[Any] | None = None
        self._alone_paused = asyncio.Event()

    async def run(self, stop: asyncio.Event, *, drain_timeout_s: float = 30.0) -> None:
        """Consume until `stop` is set; then stop taking messages and finish those in hand."""
        beating = asyncio.create_task(self.heartbeat.run())
        try:
            await self.consumers.start()
            log.info("stage %s consuming %s", self.stage.name, ", ".join(self.queues.values()))
            await stop.wait()
            await self.consumers.stop()
            await self._drain(drain_timeout_s)
            await self.consumers.close()
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await self.heartbeat.last()

    async def _drain(self, timeout_s: float) -> None:
        """Finish the deliveries in hand (for up to `timeout_s`), once none can arrive."""
        # Deliveries the broker sent before it took the cancel reach their tasks a turn or two
        # later; they are in hand too.
        for _ in range(_TURNS):
            await asyncio.sleep(0)
        if not self._in_flight:
            return
        log.info("stage %s finishing %d in-flight messages", self.stage.name, len(self._in_flight))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._in_flight and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(set(self._in_flight), timeout=left)
        # Unfinished work is not acked: closing the consumer hands it back to the queue.
        for task in list(self._in_flight):
            task.cancel()

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
                if self._alone is None and ctx.deliveries and refuse(ctx, self.tuned) is None:
                    outcome = await self._alone_in_hand(lane, ctx)
                else:
                    outcome = await self._handling(ctx)
                self.stats.settled(outcome)
        finally:
            self._in_flight.discard(task)

    async def _alone_in_hand(self, lane: routing.Lane, ctx: DeliveryContext) -> Outcome:
        """Handle a redelivered message with nothing else in hand: take no more deliveries,
        let the running handlers finish and park the rest, then run it, then consume again
        (stages/runtime/isolation.py)."""
        self._alone = asyncio.current_task()
        self._alone_paused.clear()
        try:
            await self.consumers.pause()
            self._alone_paused.set()
            await self._others_settled()
            await self.consumers.fence()
            assert ctx.msg is not None, "refuse() lets no invalid message run"
            index, count, _ = ctx.msg.unit()
            log.warning(
                "%s: job %s: %s batch %d/%d was handed out %d time(s) before and never settled "
                "(its worker may have died on it); running it alone",
                ctx.stage,
                ctx.job_id,
                ctx.msg.filename,
                index + 1,
                count,
                ctx.deliveries,
            )
            return await self._handling(ctx)
        finally:
            if not self.consumers.stopping:
                # Stragglers (sent before the consumers were cancelled) are parked by now.
                await self._others_settled()
            self._alone = None
            await self.consumers.resume()

    async def _others_settled(self) -> None:
        """Wait until every delivery in hand but this task's is settled."""
        # Deliveries the broker sent before it took the cancel reach their tasks a turn or
        # two of the loop later (aio-pika hands each to a task of its own).
        for _ in range(_TURNS):
            await asyncio.sleep(0)
        while others := self._in_flight - {asyncio.current_task()}:
            await asyncio.wait(others)

    async def process(
        self, delivery: Delivery, lane: routing.Lane = routing.INTERACTIVE
    ) -> Outcome:
        """Handle one delivery of `lane` to its end (ack, retry tier, dead letter or requeue),
        its handler in one of the stage's slots; returns how it was settled."""
        return await self._handling(self._read(delivery, lane))

    def _read(self, delivery: Delivery, lane: routing.Lane) -> DeliveryContext:
        return read_delivery(
            delivery,
            self.stage.name,
            self.queues[lane],
            self.stage.input,
            lane,
            signer=self.broker.signer,
            topic=self.stage.spec.input_key,
        )

    async def _decide_and_settle(self, ctx: DeliveryContext) -> Outcome:
        """What the layers wrap: decide how the delivery ends, then settle it."""
        outcome: Outcome | None = refuse(ctx, self.tuned)
        if outcome is None and self._alone not in (None, asyncio.current_task()):
            # A redelivered message runs alone: nothing else may be in hand beside it. Parked
            # once the consumers take nothing more, or the copy would come straight back.
            await self._alone_paused.wait()
            outcome = Park()
        if outcome is None:
            ended = await self._in_slot(ctx)
            outcome = decide(ctx, ended, self.stage.spec, self.tuned)
        return await self.settler.settle(ctx, outcome)

    async def _in_slot(self, ctx: DeliveryContext) -> Ended:
        """The handler, run in one of the stage's `concurrency` slots. Only the handler: the
        slot is free again before the outputs and the event are confirmed, so the next
        delivery's handler runs while the broker confirms this one's (the prefetch bounds
        what is in hand), and the progress events of both can share a message."""
        assert ctx.msg is not None
        async with self.gate.slot(ctx.lane):
            # The handler's time starts now, not while it waited for a slot.
            ctx.started_s = time.perf_counter()
            return await self._run(ctx.msg, ctx.attempt)

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
