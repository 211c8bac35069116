"""Progress events of deliveries finished together share one broker message, and the
tracker reads them as it reads single events: the in-memory broker double, no RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import pipeline, routing
from contracts.errors import Transient
from contracts.events import JobEvent, JobEvents, events_of
from contracts.messages import (
    Chunk,
    ChunkBatch,
    DocumentParsed,
    Message,
)
from contracts.settings import Settings
from gateway.store.tracker import _parse
from stages.runtime.event_batcher import EventBatcher
from stages.runtime.memory_broker import MemoryBroker
from stages.runtime.runner import StageRunner
from stages.stage import Stage

NS = "batches"
TRACKER = routing.tracker_queue(NS)
INDEX_PROGRESS = routing.job_event_key("index", "progress")


def progress(job: str, stage: str = "index") -> JobEvent:
    """One finished unit of `job`'s work in `stage`."""
    return JobEvent(job_id=job, document_id=f"doc-{job}", stage=stage, kind="progress")


def memory_broker() -> MemoryBroker:
    """A fresh broker double for the test namespace."""
    return MemoryBroker(Settings(namespace=NS))


async def test_events_ready_together_go_out_as_one_confirmed_message() -> None:
    broker = memory_broker()
    batcher = EventBatcher(broker, "index")
    await asyncio.gather(*(batcher.publish([progress(f"j{n}")]) for n in range(5)))
    (message,) = broker.messages(TRACKER)
    assert message.routing_key == INDEX_PROGRESS
    assert [e.job_id for e in events_of(message.body)] == ["j0", "j1", "j2", "j3", "j4"]
    assert (batcher.events, batcher.messages) == (5, 1)


async def test_a_lone_event_goes_out_as_a_plain_job_event() -> None:
    broker = memory_broker()
    await EventBatcher(broker, "index").publish([progress("j1")])
    (message,) = broker.messages(TRACKER)
    assert message.model(JobEvent).job_id == "j1"


class _HeldBroker(MemoryBroker):
    """TEST DOUBLE: the memory broker, with each publish held until the test lets it go, as
    a confirm still in flight."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.release = asyncio.Event()
        self.publishing = asyncio.Event()

    async def publish(self, model: Any, routing_key: str | None = None, **kw: Any) -> None:
        self.publishing.set()
        await self.release.wait()
        await super().publish(model, routing_key, **kw)


async def test_events_arriving_during_a_flush_wait_for_the_next_one() -> None:
    broker = _HeldBroker(Settings(namespace=NS))
    batcher = EventBatcher(broker, "index")
    first = asyncio.create_task(batcher.publish([progress("first")]))
    await broker.publishing.wait()  # the flush of `first` is in flight
    later = [asyncio.create_task(batcher.publish([progress(f"later{n}")])) for n in range(3)]
    await asyncio.sleep(0)
    assert not first.done()
    broker.release.set()
    await asyncio.gather(first, *later)
    bodies = [events_of(m.body) for m in broker.messages(TRACKER)]
    assert [[e.job_id for e in events] for events in bodies] == [
        ["first"],
        ["later0", "later1", "later2"],
    ]


async def test_a_refused_flush_fails_every_publish_it_carried() -> None:
    broker = memory_broker()
    broker.fail(INDEX_PROGRESS, Transient("broker away"))
    batcher = EventBatcher(broker, "index")
    results = await asyncio.gather(
        *(batcher.publish([progress(f"j{n}")]) for n in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [Transient] * 3
    assert broker.messages(TRACKER) == []
    # The next event is sent afresh, not stuck behind the failure.
    broker.heal()
    await batcher.publish([progress("after")])
    assert [e.job_id for m in broker.messages(TRACKER) for e in events_of(m.body)] == ["after"]


def test_a_batch_speaks_only_of_its_own_stage_progress() -> None:
    with pytest.raises(ValidationError):
        JobEvents(stage="index", events=[progress("j1"), progress("j2", stage="parse")])
    failed = JobEvent(job_id="j3", document_id="d3", stage="index", kind="failed")
    with pytest.raises(ValidationError):
        JobEvents(stage="index", events=[progress("j1"), failed])


def test_a_message_is_read_only_under_its_sender_key() -> None:
    body = JobEvents(stage="index", events=[progress("j1"), progress("j2")]).model_dump_json()
    assert len(events_of(body, INDEX_PROGRESS)) == 2
    with pytest.raises(ValueError, match="says it is"):
        events_of(body, routing.job_event_key("parse", "progress"))
    with pytest.raises(ValueError, match="says it is"):
        events_of(progress("j1").model_dump_json(), routing.job_event_key("chunk", "progress"))


class _TrackerDelivery:
    """TEST DOUBLE of an aio-pika delivery, as the tracker's `_parse` reads one."""

    def __init__(self, routing_key: str, body: bytes, headers: dict[str, Any]) -> None:
        self.routing_key = routing_key
        self.body = body
        self.headers = headers


async def test_the_tracker_reads_a_signed_batch_and_drops_a_moved_one() -> None:
    broker = memory_broker()
    batcher = EventBatcher(broker, "index")
    await asyncio.gather(batcher.publish([progress("j2")]), batcher.publish([progress("j3")]))
    (batch,) = broker.messages(TRACKER)
    read = _parse(
        _TrackerDelivery(batch.routing_key, batch.body, dict(batch.headers)),  # type: ignore[arg-type]
        broker.signer,
    )
    assert [e.job_id for e in read] == ["j2", "j3"]
    # The same bytes under another stage's key: its signature does not hold there.
    moved = _TrackerDelivery("job.parse.progress", batch.body, dict(batch.headers))
    assert _parse(moved, broker.signer) == []  # type: ignore[arg-type]


async def _startup(settings: Settings) -> None:
    return None


async def _hand_on(msg: ChunkBatch, ctx: None) -> Sequence[Message]:
    return [msg]


# The optional enrich stage's contract (a chunk batch in, the same batch out), doing nothing.
HANDING_ON: Stage[ChunkBatch, None] = Stage(spec=pipeline.ENRICH, startup=_startup, handle=_hand_on)


def _batch(job: str) -> ChunkBatch:
    chunk = Chunk(chunk_id=f"c-{job}", chunk_index=0, text="some text")
    return ChunkBatch(
        job_id=job,
        document_id=f"doc-{job}",
        collection="c",
        filename=f"{job}.txt",
        batch_index=0,
        batch_count=1,
        chunks_total=1,
        chunks=[chunk],
    )


async def test_a_busy_stage_sends_fewer_event_messages_than_it_settles_deliveries() -> None:
    settings = Settings(namespace=NS, stages="parse,chunk,enrich,embed,index")
    broker = MemoryBroker(settings)
    runner = StageRunner(HANDING_ON, None, settings, broker)
    queue = routing.stage_queue(NS, "enrich")
    for n in range(20):
        body = _batch(f"j{n}").model_dump_json().encode()
        broker.put(queue, body, routing_key=routing.DOC_TO_ENRICH, message_id=f"m{n}")
    deliveries = [broker.take(queue) for _ in range(20)]
    await asyncio.gather(*(runner.process(d) for d in deliveries))
    messages = broker.messages(TRACKER)
    events = [e for m in messages for e in events_of(m.body)]
    # Every delivery's progress is there once; the messages carrying them are fewer.
    assert sorted(e.job_id for e in events) == sorted(f"j{n}" for n in range(20))
    assert len(messages) < len(events)
    assert len(broker.messages(routing.stage_queue(NS, "embed"))) == 20
    assert all(d.acked for d in deliveries)


def _parsed(job: str) -> DocumentParsed:
    return DocumentParsed(
        job_id=job,
        document_id=f"doc-{job}",
        collection="c",
        filename=f"{job}.pdf",
        blob_sha256="a" * 64,
        parsed_sha256="b" * 64,
        pages=3,
    )


async def _chunks(msg: DocumentParsed, ctx: None) -> Sequence[Message]:
    return [_batch(msg.job_id)]


class _EventsHeld(MemoryBroker):
    """TEST DOUBLE: the memory broker, holding every job-event publish until released."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def publish(self, model: Any, routing_key: str | None = None, **kw: Any) -> None:
        if isinstance(model, JobEvent | JobEvents):
            self.holding.set()
            await self.release.wait()
        await super().publish(model, routing_key, **kw)


async def test_a_delivery_is_acked_only_once_its_batched_event_is_confirmed() -> None:
    broker = _EventsHeld(Settings(namespace=NS))
    stage: Stage[Any, None] = Stage(spec=pipeline.CHUNK, startup=_startup, handle=_chunks)
    runner = StageRunner(stage, None, broker.settings, broker)
    queue = routing.stage_queue(NS, "chunk")
    broker.put(queue, _parsed("j1").model_dump_json().encode(), routing_key=routing.DOC_PARSED)
    delivery = broker.take(queue)
    settling = asyncio.create_task(runner.process(delivery))
    await broker.holding.wait()
    # The output is confirmed, the event is not yet: no ack.
    assert len(broker.messages(routing.stage_queue(NS, "embed"))) == 1
    assert not delivery.acked
    broker.release.set()
    await settling
    assert delivery.acked


async def test_a_cancelled_flush_fails_the_publishes_waiting_on_it() -> None:
    broker = _EventsHeld(Settings(namespace=NS))
    batcher = EventBatcher(broker, "index")
    first = asyncio.create_task(batcher.publish([progress("j1")]))
    await broker.holding.wait()
    waiting = asyncio.create_task(batcher.publish([progress("j2")]))
    await asyncio.sleep(0)
    assert batcher._flushing is not None
    batcher._flushing.cancel()
    results = await asyncio.gather(first, waiting, return_exceptions=True)
    # Neither hangs: each delivery is settled as a failed publish (redelivered).
    assert [type(r) for r in results] == [Transient, Transient]
