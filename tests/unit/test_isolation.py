"""A redelivered message runs alone (stages/runtime/isolation.py), against the in-memory broker
double: when its handler runs, it is the only delivery the stage holds, so a poison message
that kills its worker hands back no innocent message with it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from contracts import pipeline, routing
from contracts.errors import Transient
from contracts.messages import Chunk, ChunkBatch, EmbeddedBatch, Message, PackedVectors
from contracts.settings import Settings
from contracts.topology import ERROR_CODE_HEADER
from stages.runtime.isolation import DEATHS_HEADER, deaths, moved_headers
from stages.runtime.memory_broker import MemoryBroker, _Consumer
from stages.runtime.outcome import Retry
from stages.runtime.ports import OnDelivery
from stages.runtime.reading import DELIVERY_COUNT_HEADER
from stages.runtime.runner import StageRunner
from stages.stage import Stage

NS = "iso"
QUEUE = routing.stage_queue(NS, "embed")
NEXT = routing.stage_queue(NS, "index")
DEAD = routing.dead_letter_queue(NS)
LIMIT = 3


class Broker(MemoryBroker):
    """The memory broker, keeping every consumer it made (paused ones too)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.made: list[_Consumer] = []

    async def consume(self, queue: str, prefetch: int, on_delivery: OnDelivery) -> _Consumer:
        """Register a consumer and keep it."""
        consumer = await super().consume(queue, prefetch, on_delivery)
        self.made.append(consumer)
        return consumer

    def in_hand(self) -> int:
        """Deliveries handed out and not settled yet, on any consumer."""
        return sum(consumer.unsettled() for consumer in self.made)


class Embed:
    """The handler of the test stage: records what the stage held when each batch ran."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.held: dict[str, int] = {}
        self.failing: set[str] = set()

    async def __call__(self, msg: ChunkBatch) -> Sequence[Message]:
        self.held[msg.job_id] = self.broker.in_hand()
        # A few turns of the loop, so deliveries in hand overlap as they do on a busy worker.
        for _ in range(3):
            await asyncio.sleep(0)
        if msg.job_id in self.failing:
            raise Transient("the embedder is away")
        vectors = PackedVectors.pack([[1.0, 0.0] for _ in msg.chunks], 2)
        fields: dict[str, Any] = {**msg.envelope(), "chunks": msg.chunks, "vectors": vectors}
        fields |= {"batch_index": 0, "batch_count": 1, "chunks_total": 1}
        return [EmbeddedBatch(**fields)]


async def _startup(settings: Settings) -> None:
    return None


async def _handle(msg: ChunkBatch, embed: Embed) -> Sequence[Message]:
    return await embed(msg)


STAGE: Stage[ChunkBatch, Any] = Stage(spec=pipeline.EMBED, startup=_startup, handle=_handle)


def batch(job: str) -> bytes:
    """The only batch of one job's document."""
    chunk = Chunk(chunk_id=f"{job}-c0", chunk_index=0, text="petrels patter on the waves")
    return (
        ChunkBatch(
            job_id=job,
            document_id=f"doc-{job}",
            collection="default",
            filename=f"{job}.md",
            batch_index=0,
            batch_count=1,
            chunks_total=1,
            chunks=[chunk],
        )
        .model_dump_json()
        .encode()
    )


def runner_on(broker: Broker) -> tuple[StageRunner, Embed]:
    """A runner of the test stage on `broker`, and its handler."""
    embed = Embed(broker)
    return StageRunner(STAGE, embed, broker.settings, broker), embed


def new_broker() -> Broker:
    """A memory broker with the stage's default prefetch and concurrency (32 each)."""
    return Broker(Settings(namespace=NS, transient_retries=0, delivery_limit=LIMIT))


async def run_until_idle(broker: Broker, runner: StageRunner) -> None:
    """Run the stage until everything queued was handled, then stop it."""
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop, drain_timeout_s=5))
    for _ in range(1000):
        if len(broker.consumers) == len(routing.LANES):
            break
        await asyncio.sleep(0)
    await broker.flow()
    stop.set()
    await running


def put(broker: Broker, job: str, headers: dict[str, Any] | None = None) -> None:
    """Queue one batch as the chunk stage would have, with `headers` of a redelivery."""
    broker.put(QUEUE, batch(job), headers=headers, routing_key=routing.DOC_CHUNKED, message_id=job)


async def test_a_redelivered_message_runs_with_nothing_else_in_hand() -> None:
    broker = new_broker()
    runner, embed = runner_on(broker)
    put(broker, "fresh-1")
    put(broker, "fresh-2")
    put(broker, "suspect-1", {DELIVERY_COUNT_HEADER: 1})
    put(broker, "fresh-3")
    put(broker, "suspect-2", {DELIVERY_COUNT_HEADER: 2})
    put(broker, "fresh-4")

    await run_until_idle(broker, runner)

    # Each ran once, and each redelivered one with only itself in hand.
    done = sorted(m.model(EmbeddedBatch).job_id for m in broker.messages(NEXT))
    assert (
        done
        == sorted(embed.held)
        == sorted(["fresh-1", "fresh-2", "fresh-3", "fresh-4", "suspect-1", "suspect-2"])
    )
    assert embed.held["suspect-1"] == embed.held["suspect-2"] == 1, embed.held
    assert embed.held["fresh-1"] > 1, "first deliveries still run side by side"
    # What was in hand beside a suspect went to the back of the queue, its deaths carried.
    parked = {str(m.message_id): m.headers for m in broker.published if m.routing_key == QUEUE}
    # The first suspect ran alone first: the second one was in hand beside it, and parked.
    assert parked["suspect-2"][DEATHS_HEADER] == 2
    assert all(DELIVERY_COUNT_HEADER not in headers for headers in parked.values())
    assert all(DEATHS_HEADER not in parked[job] for job in parked if job.startswith("fresh"))
    assert broker.messages(QUEUE) == [] and broker.messages(DEAD) == []
    # The stage consumed again after each, and stopped cleanly at the end.
    assert len(broker.made) > len(routing.LANES)
    assert all(consumer.closed for consumer in broker.made)
    assert broker.consumers == {}


async def test_deaths_add_up_over_copies_until_the_message_is_set_aside() -> None:
    broker = new_broker()
    runner, embed = runner_on(broker)
    # A copy parked after two deaths, then handed back once more: three deaths in all.
    put(broker, "poison", {DEATHS_HEADER: LIMIT - 1, DELIVERY_COUNT_HEADER: 1})
    await run_until_idle(broker, runner)
    assert "poison" not in embed.held
    (letter,) = broker.messages(DEAD)
    assert letter.headers[ERROR_CODE_HEADER] == "worker_crashed"


async def test_a_retry_carries_its_deaths_and_not_the_brokers_count() -> None:
    broker = new_broker()
    runner, embed = runner_on(broker)
    embed.failing.add("flaky")
    put(broker, "flaky", {DELIVERY_COUNT_HEADER: 1})
    delivery = broker.take(QUEUE)
    outcome = await runner.process(delivery)
    assert isinstance(outcome, Retry)
    (retry,) = broker.messages(routing.retry_queue(NS, "embed", outcome.delay_s))
    assert DELIVERY_COUNT_HEADER not in retry.headers
    assert retry.headers[DEATHS_HEADER] == 1
    assert deaths(retry.headers) == 1


def test_deaths_count_the_brokers_counts_and_earlier_copies() -> None:
    assert deaths({}) == 0
    assert deaths({DELIVERY_COUNT_HEADER: 2}) == 2
    # 4.3+ counts a worker's death only as an acquisition.
    assert deaths({"x-delivery-count": 0, "x-acquired-count": 1, DEATHS_HEADER: 2}) == 3
    moved = moved_headers({"traceparent": "t", DELIVERY_COUNT_HEADER: 4, DEATHS_HEADER: 1}, 5)
    assert moved == {"traceparent": "t", DEATHS_HEADER: 5}
    assert moved_headers({DELIVERY_COUNT_HEADER: 0}, 0) == {}


async def test_a_delivery_parked_beside_a_full_queue_waits_in_the_first_tier() -> None:
    broker = new_broker()
    runner, embed = runner_on(broker)
    put(broker, "suspect", {DELIVERY_COUNT_HEADER: 1})
    put(broker, "fresh")
    # Its own queue takes nothing more: handed back unsettled, it would count as a death.
    broker.refuse(QUEUE)
    await run_until_idle(broker, runner)
    assert embed.held == {"suspect": 1}
    (waiting,) = broker.messages(routing.retry_queue(NS, "embed", 1))
    assert waiting.message_id == "fresh"
    assert not [entry for entry in broker.journal if entry.startswith("requeue")]
