"""The runner's lanes and heartbeats, against the in-memory broker double: no RabbitMQ.

A tiny embed-shaped stage consumes both lanes' queues; `MemoryBroker.flow` hands each
consumer up to its prefetch at once, as RabbitMQ does, so deliveries of both lanes wait for
the stage's one slot and the test reads the order they were handled in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from contracts import pipeline, routing
from contracts.errors import Permanent, Transient
from contracts.events import JobEvent, WorkerHeartbeat, events_of
from contracts.messages import Chunk, ChunkBatch, EmbeddedBatch, Message, PackedVectors
from contracts.routing import BULK, INTERACTIVE, Lane
from contracts.settings import Settings
from contracts.topology import ATTEMPT_HEADER, QueueSpec
from stages.runtime.heartbeat import Heartbeat, WorkerStats
from stages.runtime.layers import Handling
from stages.runtime.memory_broker import MemoryBroker
from stages.runtime.outcome import DeadLetter, Done, Outcome, Retry
from stages.runtime.reading import DeliveryContext
from stages.runtime.runner import StageRunner
from stages.stage import Stage

NS = "lanes"
INT, BLK = INTERACTIVE, BULK
TRACKER = routing.tracker_queue(NS)
DEAD = routing.dead_letter_queue(NS)
HEARTBEATS = routing.heartbeat_queue(NS, "test-gateway")

Behaviour = Callable[[ChunkBatch], Awaitable[Sequence[Message]]]


async def _startup(settings: Settings) -> None:
    return None


async def _handle(msg: ChunkBatch, behave: Behaviour) -> Sequence[Message]:
    return await behave(msg)


STAGE: Stage[ChunkBatch, Any] = Stage(spec=pipeline.EMBED, startup=_startup, handle=_handle)


def stage_queue(lane: Lane, stage: str = "embed") -> str:
    """One stage's queue of `lane`."""
    return routing.stage_queue(NS, stage, lane)


def batch(job: str, priority: Lane) -> ChunkBatch:
    """The only batch of one job's document, in `priority`'s lane."""
    return ChunkBatch(
        job_id=job,
        document_id=f"doc-{job}",
        collection="default",
        filename=f"{job}.txt",
        priority=priority,
        batch_index=0,
        batch_count=1,
        chunks_total=1,
        chunks=[Chunk(chunk_id=job, chunk_index=0, text="terns migrate")],
    )


def embedded(msg: ChunkBatch, **changes: Any) -> EmbeddedBatch:
    """What a well-behaved embed stage makes of `msg` (with `changes`)."""
    vectors = PackedVectors.pack([[1.0, 0.0] for _ in msg.chunks], 2)
    return EmbeddedBatch(
        **{
            **msg.envelope(),
            "batch_index": msg.batch_index,
            "batch_count": msg.batch_count,
            "chunks_total": msg.chunks_total,
            "chunks": msg.chunks,
            "vectors": vectors,
            **changes,
        }
    )


@dataclass
class Handled:
    """A layer that records, in order, the job and the queue of every delivery handled."""

    seen: list[tuple[str, str, Lane]] = field(default_factory=list)

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        assert ctx.msg is not None
        self.seen.append((ctx.msg.job_id, ctx.queue, ctx.lane))
        return await inner(ctx)

    @property
    def jobs(self) -> list[str]:
        """Job ids in the order they were handled."""
        return [job for job, _, _ in self.seen]


@dataclass
class Harness:
    """A runner for the test stage on a memory broker, and what it handled."""

    broker: MemoryBroker
    runner: StageRunner
    handled: Handled

    async def publish(self, *msgs: ChunkBatch) -> None:
        """Publish as the stage before this one does (the broker picks the lane's key)."""
        for msg in msgs:
            await self.broker.publish(msg, routing.DOC_CHUNKED)

    async def run_until_idle(self) -> None:
        """Run the stage until every queued message was handled, then stop it cleanly."""
        stop = asyncio.Event()
        running = asyncio.create_task(self.runner.run(stop, drain_timeout_s=5))
        await until(lambda: len(self.broker.consumers) == len(routing.LANES))
        await self.broker.flow()
        stop.set()
        await running

    def events(self) -> list[JobEvent]:
        """The job events the tracker would read, in order."""
        return [e for m in self.broker.messages(TRACKER) for e in events_of(m.body)]

    def outputs(self, lane: Lane) -> list[EmbeddedBatch]:
        """What the index stage's queue of `lane` holds."""
        return [m.model(EmbeddedBatch) for m in self.broker.messages(stage_queue(lane, "index"))]


async def until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    """Let other tasks run until `condition` holds (a bounded number of loop turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def embeds(msg: ChunkBatch) -> Sequence[Message]:
    """The well-behaved handler; it yields once, as real work does, so others arrive."""
    await asyncio.sleep(0)
    return [embedded(msg)]


def harness(behave: Behaviour = embeds, **overrides: Any) -> Harness:
    """A runner of one slot (prefetch 2 per lane) whose handler does `behave`."""
    given: dict[str, Any] = {
        "namespace": NS,
        "transient_retries": 0,
        "retry_delays_s": (1, 10),
        "max_attempts": 3,
        "stage_overrides": {"embed": {"prefetch": 2, "concurrency": 1}},
    }
    tuned = Settings(**{**given, **overrides})
    broker = MemoryBroker(tuned)
    handled = Handled()
    runner = StageRunner(STAGE, behave, tuned, broker, layers=[handled])
    return Harness(broker, runner, handled)


async def test_publishing_keeps_the_lane() -> None:
    h = harness()
    await h.publish(batch("b1", BLK), batch("i1", INT))
    assert [m.json()["job_id"] for m in h.broker.messages(stage_queue(BLK))] == ["b1"]
    assert [m.json()["job_id"] for m in h.broker.messages(stage_queue(INT))] == ["i1"]
    assert {m.routing_key for m in h.broker.published} == {
        routing.DOC_CHUNKED,
        routing.lane_key(routing.DOC_CHUNKED, BLK),
    }


async def test_lanes_off_sends_everything_through_one_fifo() -> None:
    h = harness(lanes=False)
    await h.publish(batch("b1", BLK), batch("i1", INT))
    assert h.broker.messages(stage_queue(BLK)) == []
    assert [m.json()["job_id"] for m in h.broker.messages(stage_queue(INT))] == ["b1", "i1"]


async def test_interactive_work_is_handled_before_the_bulk_backlog_ends() -> None:
    h = harness()
    bulk = [f"b{n}" for n in range(10)]
    interactive = [f"i{n}" for n in range(3)]
    # The bulk backlog is older: first come, first served would handle it all first.
    await h.publish(*(batch(j, BLK) for j in bulk), *(batch(j, INT) for j in interactive))
    await h.run_until_idle()
    order = h.handled.jobs
    assert sorted(order) == sorted(bulk + interactive)
    last_interactive = max(order.index(j) for j in interactive)
    handled_bulk_by_then = len([j for j in order[:last_interactive] if j in bulk])
    # The two bulk batches in hand before the first interactive one, and one more that takes
    # the slot while an interactive batch's outputs are still being confirmed (the slot is
    # the handler's only): the other seven wait.
    assert handled_bulk_by_then <= 3, order
    # Each came from its own lane's queue, and its output went on in that lane.
    assert all(queue == stage_queue(lane) for _, queue, lane in h.handled.seen)
    assert {o.job_id for o in h.outputs(BLK)} == set(bulk)
    assert {o.job_id for o in h.outputs(INT)} == set(interactive)
    assert all(o.priority == BLK for o in h.outputs(BLK))


async def test_bulk_keeps_its_share_while_interactive_work_keeps_coming() -> None:
    h = harness(bulk_share=0.25)
    bulk = [f"b{n}" for n in range(6)]
    interactive = [f"i{n}" for n in range(24)]
    await h.publish(*(batch(j, BLK) for j in bulk), *(batch(j, INT) for j in interactive))
    await h.run_until_idle()
    order = h.handled.jobs
    # While interactive work waited the whole time, every fourth slot went to bulk.
    first_twenty = order[:20]
    assert 4 <= len([j for j in first_twenty if j in bulk]) <= 6, order
    assert order.index("b5") < order.index("i23"), order


async def test_lanes_off_handles_in_arrival_order() -> None:
    h = harness(lanes=False)
    jobs = [("b0", BLK), ("b1", BLK), ("i0", INT), ("b2", BLK), ("i1", INT)]
    await h.publish(*(batch(j, lane) for j, lane in jobs))
    await h.run_until_idle()
    assert h.handled.jobs == [j for j, _ in jobs]


@pytest.mark.parametrize(("given", "made"), [(BLK, INT), (INT, BLK)])
async def test_outputs_are_restamped_with_their_inputs_lane(given: Lane, made: Lane) -> None:
    async def moves_lanes(msg: ChunkBatch) -> Sequence[Message]:
        # A stage that builds its output without the envelope's priority (or changes it).
        return [embedded(msg, priority=made)]

    h = harness(moves_lanes)
    await h.publish(batch("j1", given))
    await h.run_until_idle()
    (out,) = h.outputs(given)
    assert out.priority == given and h.outputs(made) == []


@pytest.mark.parametrize("lane", [INT, BLK])
async def test_a_retried_message_comes_back_to_its_own_lane(lane: Lane) -> None:
    attempts: list[int] = []

    async def fails_once(msg: ChunkBatch) -> Sequence[Message]:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise Transient("the model server is warming up")
        return [embedded(msg)]

    h = harness(fails_once)
    await h.publish(batch("j1", lane))
    outcome = await h.runner.process(h.broker.take(stage_queue(lane)), lane)
    assert isinstance(outcome, Retry)
    (parked,) = h.broker.messages(routing.retry_queue(NS, "embed", 1, lane))
    assert parked.headers[ATTEMPT_HEADER] == 2
    other = BULK if lane == INTERACTIVE else INTERACTIVE
    assert h.broker.messages(routing.retry_queue(NS, "embed", 1, other)) == []
    (event,) = h.events()
    assert (event.kind, event.attempt, event.job_id) == ("retrying", 1, "j1")
    assert event.error is not None
    assert (event.error.code, event.error.retryable) == ("temporarily_unavailable", True)
    assert event.error.message == "the model server is warming up"
    # The tier's TTL passes: back in the same lane's queue, consumed from there again.
    assert h.broker.expire() == 1
    assert h.broker.messages(stage_queue(other)) == []
    await h.run_until_idle()
    assert h.handled.seen[-1] == ("j1", stage_queue(lane), lane)
    assert [e.kind for e in h.events()] == ["retrying", "progress"]
    (out,) = h.outputs(lane)
    assert out.job_id == "j1"


async def test_backpressure_is_no_failed_attempt_and_sends_no_retrying_event() -> None:
    h = harness()
    h.broker.refuse(routing.lane_key(routing.DOC_EMBEDDED, BLK))
    await h.publish(batch("j1", BLK))
    outcome = await h.runner.process(h.broker.take(stage_queue(BLK)), BLK)
    assert isinstance(outcome, Retry) and not outcome.spend_attempt
    assert len(h.broker.messages(routing.retry_queue(NS, "embed", 1, BLK))) == 1
    assert [e.kind for e in h.events()] == ["progress"]


async def test_a_dead_letter_keeps_the_routing_key_of_its_lane() -> None:
    async def rejects(msg: ChunkBatch) -> Sequence[Message]:
        raise Permanent("no text", code="empty_batch")

    h = harness(rejects)
    await h.publish(batch("j1", BLK))
    outcome = await h.runner.process(h.broker.take(stage_queue(BLK)), BLK)
    assert isinstance(outcome, DeadLetter)
    (dead,) = h.broker.messages(DEAD)
    assert dead.routing_key == routing.lane_key(routing.DOC_CHUNKED, BLK)


def listen_for_heartbeats(broker: MemoryBroker) -> None:
    """Bind a queue to every worker's heartbeats, as a gateway does."""
    broker.declare(
        QueueSpec(
            HEARTBEATS,
            exchange=routing.exchange(NS),
            binding_keys=(routing.WORKER_HEARTBEATS,),
        )
    )


def heartbeats(broker: MemoryBroker) -> list[WorkerHeartbeat]:
    """Every heartbeat the gateway's queue got, in order."""
    return [m.model(WorkerHeartbeat) for m in broker.messages(HEARTBEATS)]


async def test_a_heartbeat_carries_the_counters_and_the_jobs_in_hand() -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def waits(msg: ChunkBatch) -> Sequence[Message]:
        seen.append(msg.job_id)
        if msg.job_id == "bad":
            raise Permanent("no text", code="empty_batch")
        if msg.job_id == "slow":
            await release.wait()
        return [embedded(msg)]

    h = harness(waits)
    listen_for_heartbeats(h.broker)
    stop = asyncio.Event()
    running = asyncio.create_task(h.runner.run(stop, drain_timeout_s=5))
    await until(lambda: len(h.broker.consumers) == 2)
    await h.publish(batch("ok", INT), batch("bad", INT))
    await h.broker.flow()
    await h.publish(batch("slow", INT), batch("next", BLK))
    flowing = asyncio.create_task(h.broker.flow())
    # "slow" holds the one slot; "next" waits for it, in hand in the bulk lane.
    await until(lambda: seen[-1:] == ["slow"] and h.runner.gate.waiting(BLK) == 1)
    assert await h.runner.heartbeat.send()
    beat = heartbeats(h.broker)[-1]
    assert beat.stage == "embed" and beat.every_s == h.runner.settings.heartbeat_every_s
    assert (beat.processed, beat.failed, beat.stopping) == (1, 1, False)
    assert beat.in_hand == {INT: 1, BLK: 1}
    assert beat.in_hand_jobs == ["slow", "next"]
    host, pid, _ = beat.worker_id.split(":")
    assert (host, int(pid)) == (beat.host, beat.pid)
    release.set()
    await flowing
    stop.set()
    await running
    first, *_, last = heartbeats(h.broker)
    # The first one goes out at start; the last says the worker stops, with final counters.
    assert (first.processed, first.stopping) == (0, False)
    assert (last.processed, last.failed, last.stopping) == (3, 1, True)
    assert last.in_hand == {INT: 0, BLK: 0} and last.in_hand_jobs == []
    assert {b.worker_id for b in heartbeats(h.broker)} == {beat.worker_id}
    assert first.started_at == last.started_at < last.at


async def test_a_heartbeat_nobody_hears_never_hurts_the_stage() -> None:
    h = harness()
    beat = Heartbeat(h.broker, "embed", WorkerStats(), every_s=1.0)
    # No gateway bound to worker.#: the broker refuses it as unroutable.
    assert not await beat.send()
    listen_for_heartbeats(h.broker)
    h.broker.fail(routing.heartbeat_key("embed"), ConnectionError("connection reset by peer"))
    assert not await beat.send(stopping=True)
    h.broker.heal()
    assert await beat.send()
    # And a runner with nobody listening handles its work as ever.
    quiet = harness()
    await quiet.publish(batch("j1", INT))
    await quiet.run_until_idle()
    assert [o.job_id for o in quiet.outputs(INT)] == ["j1"]


def test_worker_stats_count_how_deliveries_ended() -> None:
    stats = WorkerStats()
    msg = batch("j1", INT)
    done = Done([], JobEvent(job_id="j1", document_id="d", stage="embed", kind="progress"))
    with stats.holding(INT, "j1"), stats.holding(INT, "j1"):
        assert stats.in_hand == {INT: 2, BLK: 0} and stats.jobs == ["j1"]
        stats.settled(done)
        stats.settled(DeadLetter(Permanent("x"), retryable=False))
        stats.settled(Retry(1, 1, True, RuntimeError(msg.job_id)))
    assert (stats.processed, stats.failed, stats.in_hand, stats.jobs) == (
        1,
        1,
        {INT: 0, BLK: 0},
        [],
    )
