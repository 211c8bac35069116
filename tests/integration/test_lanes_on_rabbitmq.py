"""Lanes on a real RabbitMQ: a stage's two queues, its one slot, retries and heartbeats.

Each test runs the stage runtime (the `StageRunner` a `sluice stage` process runs, on the
real aio-pika broker) in a namespace of its own, with a handler that takes a while, and
records in what order and from which queue it handled each delivery. RabbitMQ pushes both
lanes' queues at once; only the runtime's lane gate decides who gets the slot.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from broker import BrokerHandle

from contracts import pipeline, routing
from contracts.errors import Transient
from contracts.events import WorkerHeartbeat, events_of
from contracts.messages import Chunk, ChunkBatch, Message, WebhookRequest
from contracts.routing import BULK, INTERACTIVE, Lane
from contracts.settings import Settings
from contracts.topology import STAGE_HEADER
from stages.infra import dead_letter_queue as dlq
from stages.infra.broker import Broker
from stages.runtime.layers import Handling
from stages.runtime.outcome import Outcome
from stages.runtime.reading import DeliveryContext
from stages.runtime.runner import StageRunner
from stages.stage import Stage

pytestmark = pytest.mark.integration

INT, BLK = INTERACTIVE, BULK
# Long enough that a backlog takes a while, short enough that a test takes seconds.
WORK_S = 0.03
DEADLINE_S = 30.0


@dataclass
class Recorded:
    """Every delivery handled, in order: job, queue, lane, attempt."""

    seen: list[tuple[str, str, Lane, int]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        outcome = await inner(ctx)
        assert ctx.msg is not None
        self.seen.append((ctx.msg.job_id, ctx.queue, ctx.lane, ctx.attempt))
        self.changed.set()
        return outcome

    def jobs(self, prefix: str = "") -> list[str]:
        """Jobs handled so far (those starting with `prefix`), in order."""
        return [job for job, *_ in self.seen if job.startswith(prefix)]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition` holds after some delivery was handled, or fail at the
        deadline."""
        async with asyncio.timeout(DEADLINE_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


class Work:
    """The handler: takes `WORK_S`, fails a job's first attempt when told to."""

    def __init__(self, fail_first: set[str] | None = None) -> None:
        self.fail_first = fail_first or set()
        self.tries: dict[str, int] = {}

    async def __call__(self, msg: ChunkBatch) -> Sequence[Message]:
        self.tries[msg.job_id] = self.tries.get(msg.job_id, 0) + 1
        await asyncio.sleep(WORK_S)
        if msg.job_id in self.fail_first and self.tries[msg.job_id] == 1:
            raise Transient(f"{msg.job_id}: the model server is warming up")
        return []


async def _startup(settings: Settings) -> None:
    return None


async def _handle(msg: ChunkBatch, work: Work) -> Sequence[Message]:
    return await work(msg)


STAGE: Stage[ChunkBatch, Any] = Stage(spec=pipeline.EMBED, startup=_startup, handle=_handle)


def batch(job: str, priority: Lane) -> ChunkBatch:
    """One job's only chunk batch, in `priority`'s lane."""
    return ChunkBatch(
        job_id=job,
        document_id=f"doc-{job}",
        collection="default",
        filename=f"{job}.txt",
        priority=priority,
        batch_index=1,  # not the first unit: no `started` announcements in the tracker queue
        batch_count=2,
        chunks_total=2,
        chunks=[Chunk(chunk_id=job, chunk_index=0, text="terns migrate")],
    )


@dataclass
class Lanes:
    """A namespace of the test's own: its settings, a publishing broker, a running stage."""

    settings: Settings
    broker: Broker
    recorded: Recorded = field(default_factory=Recorded)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _running: list[asyncio.Task[None]] = field(default_factory=list)
    _brokers: list[Broker] = field(default_factory=list)

    async def publish(self, *msgs: ChunkBatch) -> None:
        """Publish as the stage before embed does (the broker picks the lane's key)."""
        await asyncio.gather(*(self.broker.publish(m, routing.DOC_CHUNKED) for m in msgs))

    async def start(self, work: Work) -> StageRunner:
        """Run the stage, as `sluice stage embed` does, on a connection of its own."""
        broker = Broker(self.settings)
        await broker.connect(wait_s=10)
        self._brokers.append(broker)
        runner = StageRunner(STAGE, work, self.settings, broker, layers=[self.recorded])
        self._running.append(asyncio.create_task(runner.run(self._stop, drain_timeout_s=5)))
        return runner

    async def stop(self) -> None:
        """Stop the stage cleanly (drain, last heartbeat) and close its connection."""
        self._stop.set()
        await asyncio.gather(*self._running)
        self._running.clear()
        for broker in self._brokers:
            await broker.close()
        self._brokers.clear()

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        """A plain channel on the publishing connection, to look at queues."""
        return await self.broker.connection.channel()


@pytest.fixture
async def lanes(broker: BrokerHandle) -> AsyncIterator[Lanes]:
    """A fresh namespace with one embed slot and 1 s retries. Each lane's consumer holds 8:
    a gate that served deliveries in the order they came would make interactive work wait
    for the bulk ones in hand before it."""
    settings = Settings(
        amqp_url=broker.amqp_url,
        namespace=f"lanes-{uuid.uuid4().hex[:8]}",
        transient_retries=0,
        retry_delays_s=(1,),
        heartbeat_every_s=0.2,
        stage_overrides={"embed": {"prefetch": 8, "concurrency": 1}},
    )
    publisher = Broker(settings)
    await publisher.connect(wait_s=10)
    running = Lanes(settings, publisher)
    try:
        yield running
    finally:
        await running.stop()
        # Leave the broker as it was: the namespace's queues and exchanges go with the test.
        channel = await publisher.connection.channel()
        for queue in publisher.topology.queues:
            await channel.queue_delete(queue.name)
        for exchange in publisher.topology.exchanges:
            await channel.exchange_delete(exchange.name)
        await publisher.close()


async def test_interactive_work_finishes_while_a_bulk_backlog_is_in_flight(
    lanes: Lanes,
) -> None:
    bulk = [f"bulk-{n}" for n in range(24)]
    await lanes.publish(*(batch(j, BLK) for j in bulk))
    await lanes.start(Work())
    await lanes.recorded.until(lambda: len(lanes.recorded.jobs("bulk")) >= 2)
    interactive = [f"inter-{n}" for n in range(4)]
    await lanes.publish(*(batch(j, INT) for j in interactive))
    await lanes.recorded.until(lambda: len(lanes.recorded.jobs("inter")) == len(interactive))
    bulk_done = len(lanes.recorded.jobs("bulk"))
    # One queue would have made them wait for the whole backlog, and a gate serving in order
    # of arrival for the 8 bulk deliveries in hand; interactive work waited for one or two.
    assert bulk_done <= 6, lanes.recorded.jobs()
    await lanes.recorded.until(lambda: len(lanes.recorded.jobs("bulk")) == len(bulk))
    assert sorted(lanes.recorded.jobs("bulk")) == sorted(bulk)
    assert all(
        queue.endswith(".bulk") == (lane == BLK) for _, queue, lane, _ in lanes.recorded.seen
    )


async def test_bulk_keeps_progressing_while_interactive_work_keeps_arriving(
    lanes: Lanes,
) -> None:
    bulk = [f"bulk-{n}" for n in range(5)]
    await lanes.publish(*(batch(j, BLK) for j in bulk))
    published = 0

    async def feed() -> None:
        # Keep interactive work waiting the whole time: a few always queued behind the slot.
        nonlocal published
        while True:
            while published - len(lanes.recorded.jobs("inter")) < 4:
                await lanes.publish(batch(f"inter-{published}", INT))
                published += 1
            lanes.recorded.changed.clear()
            await lanes.recorded.changed.wait()

    feeding = asyncio.create_task(feed())
    try:
        await lanes.start(Work())
        await lanes.recorded.until(lambda: len(lanes.recorded.jobs("bulk")) == len(bulk))
    finally:
        feeding.cancel()
    order = lanes.recorded.jobs()
    last_bulk = max(i for i, job in enumerate(order) if job.startswith("bulk"))
    interactive_before = len([j for j in order[:last_bulk] if j.startswith("inter")])
    # Interactive work went first (about four of every five slots at a 0.2 share), and yet
    # the whole bulk backlog got through while it kept coming.
    assert interactive_before >= 2 * len(bulk), order
    assert published - len(lanes.recorded.jobs("inter")) >= 1


async def test_a_retried_message_is_consumed_from_its_own_lane_again(lanes: Lanes) -> None:
    await lanes.start(Work(fail_first={"retry-i", "retry-b"}))
    await lanes.publish(batch("retry-i", INT), batch("retry-b", BLK))
    await lanes.recorded.until(lambda: len(lanes.recorded.seen) == 4)
    queues = {(job, attempt): (queue, lane) for job, queue, lane, attempt in lanes.recorded.seen}
    ns = lanes.settings.namespace
    assert queues[("retry-i", 2)] == (routing.stage_queue(ns, "embed", INT), INT)
    assert queues[("retry-b", 2)] == (routing.stage_queue(ns, "embed", BLK), BLK)
    # Each failed attempt told the job why, before it was acked.
    channel = await lanes.channel()
    tracker = await channel.get_queue(routing.tracker_queue(ns))
    kinds: list[tuple[str, str, int]] = []
    while (got := await tracker.get(no_ack=True, fail=False)) is not None:
        for event in events_of(got.body):
            kinds.append((event.job_id, event.kind, event.attempt))
    await channel.close()
    assert sorted(kinds) == [
        ("retry-b", "progress", 2),
        ("retry-b", "retrying", 1),
        ("retry-i", "progress", 2),
        ("retry-i", "retrying", 1),
    ]


async def test_heartbeats_reach_a_gateway_and_the_last_one_says_stopping(lanes: Lanes) -> None:
    channel = await lanes.channel()
    exchange = await channel.get_exchange(routing.exchange(lanes.settings.namespace))
    heard = await channel.declare_queue(exclusive=True)
    await heard.bind(exchange, routing.WORKER_HEARTBEATS)
    runner = await lanes.start(Work())
    await lanes.publish(batch("beat-1", INT), batch("beat-2", BLK))
    await lanes.recorded.until(lambda: len(lanes.recorded.seen) == 2)
    await runner.heartbeat.send()
    await lanes.stop()
    beats: list[WorkerHeartbeat] = []
    while (got := await heard.get(no_ack=True, fail=False)) is not None:
        assert got.routing_key == routing.heartbeat_key("embed")
        beats.append(WorkerHeartbeat.model_validate_json(got.body))
    await channel.close()
    assert {b.worker_id for b in beats} == {runner.heartbeat.worker_id}
    assert [b.stopping for b in beats][-1:] == [True] and not any(b.stopping for b in beats[:-1])
    assert (beats[-1].processed, beats[-1].failed) == (2, 0)
    assert beats[-1].in_hand == {INT: 0, BLK: 0}


@pytest.mark.parametrize(
    ("priority", "routing_key", "lane"),
    [("bulk", "doc.chunked.bulk", BLK), ("interactive", "doc.chunked", INT), (None, "x.bulk", BLK)],
)
async def test_a_replayed_dead_letter_goes_back_to_its_own_lane(
    lanes: Lanes, priority: str | None, routing_key: str, lane: Lane
) -> None:
    ns = lanes.settings.namespace
    body = batch("dead-1", lane).model_dump(mode="json")
    if priority is None:
        # A letter from before lanes: its routing key says where it was going.
        del body["priority"]
    await lanes.broker.publish_raw(
        routing.dead_letter_exchange(ns),
        routing_key,
        json.dumps(body).encode(),
        headers={STAGE_HEADER: "embed"},
    )
    assert await dlq.replay(lanes.broker, stage="embed") == 1
    channel = await lanes.channel()
    other = BLK if lane == INT else INT
    landed = await (await channel.get_queue(routing.stage_queue(ns, "embed", lane))).get(
        fail=False, no_ack=True
    )
    elsewhere = await (await channel.get_queue(routing.stage_queue(ns, "embed", other))).get(
        fail=False, no_ack=True
    )
    await channel.close()
    assert landed is not None and elsewhere is None
    assert ChunkBatch.model_validate_json(landed.body).job_id == "dead-1"


async def test_a_webhook_dead_letter_replays_by_stage_but_not_with_its_job(lanes: Lanes) -> None:
    """`sluice dlq replay --stage webhook` sends a webhook that never got through again; a
    job retry (`pipeline_only`) leaves it, so it cannot re-send the job as it was."""
    ns = lanes.settings.namespace
    letter = WebhookRequest(
        job_id="hooked-1",
        document_id="doc-1",
        collection="default",
        filename="a.txt",
        callback_url="https://example.com/hook",
        job={"job_id": "hooked-1", "status": "indexed"},
        delivery_id="hooked-1.1",
    )
    await lanes.broker.publish_raw(
        routing.dead_letter_exchange(ns),
        routing.WEBHOOK,
        letter.model_dump_json().encode(),
        headers={STAGE_HEADER: "webhook"},
    )
    assert await dlq.replay(lanes.broker, job_id="hooked-1", pipeline_only=True) == 0
    assert await dlq.replay(lanes.broker, stage="webhook") == 1
    channel = await lanes.channel()
    landed = await (await channel.get_queue(routing.stage_queue(ns, "webhook", INT))).get(
        fail=False, no_ack=True
    )
    await channel.close()
    assert landed is not None
    assert WebhookRequest.model_validate_json(landed.body).delivery_id == "hooked-1.1"
