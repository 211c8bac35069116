"""The stage runtime's whole decision table, against the in-memory broker double: no RabbitMQ.

Each test drives a tiny embed-shaped stage whose handler the test scripts, and reads what the
broker was asked to do: which queue got what, with which headers, and how the delivery was
settled. What only a real broker can show stays in tests/integration/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from tenacity import wait_none

from contracts import pipeline, routing
from contracts.errors import Permanent, StorageFull, Transient
from contracts.events import JobEvent, events_of
from contracts.messages import Chunk, ChunkBatch, EmbeddedBatch, Message, PackedVectors
from contracts.settings import Settings
from contracts.topology import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    JOB_HEADER,
    STAGE_HEADER,
)
from stages.infra.logs import current_context
from stages.runtime.layers import Handling
from stages.runtime.memory_broker import MemoryBroker, MemoryDelivery, Published
from stages.runtime.outcome import DeadLetter, Done, Outcome, Requeue, Retry
from stages.runtime.reading import DELIVERY_COUNT_HEADER, DeliveryContext
from stages.runtime.runner import StageRunner
from stages.stage import Stage

NS = "t"
STAGE_QUEUE = routing.stage_queue(NS, "embed")
NEXT_QUEUE = routing.stage_queue(NS, "index")
TRACKER = routing.tracker_queue(NS)
DEAD = routing.dead_letter_queue(NS)
TIERS = (1, 10, 60)
MAX_ATTEMPTS = 5
DELIVERY_LIMIT = 3
TRACE_HEADERS = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

Behaviour = Callable[[ChunkBatch], Awaitable[Sequence[Message]]]


async def _startup(settings: Settings) -> None:
    return None


async def _handle(msg: ChunkBatch, behave: Behaviour) -> Sequence[Message]:
    return await behave(msg)


STAGE: Stage[ChunkBatch, Any] = Stage(spec=pipeline.EMBED, startup=_startup, handle=_handle)


def batch(index: int = 0, count: int = 2) -> ChunkBatch:
    """Batch `index` of `count` of one document, one chunk each."""
    chunk = Chunk(chunk_id=f"c{index}", chunk_index=index, text="terns migrate")
    return ChunkBatch(
        job_id="job1",
        document_id="doc1",
        collection="default",
        filename="terns.pdf",
        batch_index=index,
        batch_count=count,
        chunks_total=count,
        chunks=[chunk],
    )


def embedded(msg: ChunkBatch, **changes: Any) -> EmbeddedBatch:
    """What a well-behaved embed stage makes of `msg` (with `changes` to break it)."""
    vectors = PackedVectors.pack([[1.0, 0.0] for _ in msg.chunks], 2)
    fields: dict[str, Any] = {
        **msg.envelope(),
        "batch_index": msg.batch_index,
        "batch_count": msg.batch_count,
        "chunks_total": msg.chunks_total,
        "chunks": msg.chunks,
        "vectors": vectors,
    }
    return EmbeddedBatch(**{**fields, **changes})


async def embeds(msg: ChunkBatch) -> Sequence[Message]:
    """The well-behaved handler."""
    return [embedded(msg)]


def raises(error: Exception) -> Behaviour:
    """A handler that always fails with `error`."""

    async def behave(msg: ChunkBatch) -> Sequence[Message]:
        raise error

    return behave


def retry_queue(delay_s: int) -> str:
    """The embed stage's retry tier of `delay_s`."""
    return routing.retry_queue(NS, "embed", delay_s)


def settings(**overrides: Any) -> Settings:
    """Small, fast settings: no in-process retries, so every failure is decided at once."""
    given: dict[str, Any] = {
        "namespace": NS,
        "transient_retries": 0,
        "retry_delays_s": TIERS,
        "max_attempts": MAX_ATTEMPTS,
        "delivery_limit": DELIVERY_LIMIT,
    }
    return Settings(**{**given, **overrides})


@dataclass
class Harness:
    """A runner for the test stage on a memory broker."""

    broker: MemoryBroker
    runner: StageRunner

    async def deliver(
        self, body: Message | bytes, headers: dict[str, Any] | None = None
    ) -> tuple[Outcome, MemoryDelivery]:
        """Put `body` in the stage's queue, hand it to the runner, return how it ended."""
        raw = body if isinstance(body, bytes) else body.model_dump_json().encode()
        self.broker.put(
            STAGE_QUEUE, raw, headers=headers, routing_key=routing.DOC_CHUNKED, message_id="m1"
        )
        delivery = self.broker.take(STAGE_QUEUE)
        return await self.runner.process(delivery), delivery

    def only(self, queue: str) -> Published:
        """The one message `queue` holds."""
        (message,) = self.broker.messages(queue)
        return message

    def events(self) -> list[JobEvent]:
        """The job events the tracker would read, in order."""
        return [e for m in self.broker.messages(TRACKER) for e in events_of(m.body)]

    def retry_tiers(self) -> dict[int, list[Published]]:
        """What each retry tier holds."""
        return {d: self.broker.messages(retry_queue(d)) for d in TIERS}


def harness(behave: Behaviour = embeds, *, layers: Sequence[Any] = (), **overrides: Any) -> Harness:
    """A runner whose handler does `behave`, on a fresh memory broker."""
    tuned = settings(**overrides)
    broker = MemoryBroker(tuned)
    runner = StageRunner(STAGE, behave, tuned, broker, layers=layers)
    # In-process retries without their jittered sleeps: the decisions, not the waiting.
    runner.transient_wait = wait_none()
    return Harness(broker, runner)


def failing_first(times: int, error: Exception) -> tuple[Behaviour, list[int]]:
    """A handler that fails `times` times with `error`, then embeds; and its call log."""
    calls: list[int] = []

    async def behave(msg: ChunkBatch) -> Sequence[Message]:
        calls.append(len(calls))
        if len(calls) <= times:
            raise error
        return await embeds(msg)

    return behave, calls


def assert_nothing_retried(h: Harness) -> None:
    assert h.retry_tiers() == {d: [] for d in TIERS}


async def test_success_publishes_outputs_and_progress_then_acks() -> None:
    h = harness()
    outcome, delivery = await h.deliver(batch(1, 2))
    assert isinstance(outcome, Done)
    out = h.only(NEXT_QUEUE)
    assert out.routing_key == routing.DOC_EMBEDDED
    assert out.model(EmbeddedBatch).matrix.tolist() == [[1.0, 0.0]]
    (event,) = h.events()
    assert (event.kind, event.stage, event.batch_index, event.batch_count) == (
        "progress",
        "embed",
        1,
        2,
    )
    assert delivery.acked
    # At-least-once: the ack comes only after both publishes were confirmed.
    assert h.broker.journal[-1] == "ack m1"
    assert sorted(h.broker.journal[:-1]) == [
        f"publish {NS}/{routing.DOC_EMBEDDED}",
        f"publish {NS}/job.embed.progress",
    ]
    assert h.broker.messages(DEAD) == []
    assert_nothing_retried(h)


async def test_permanent_dead_letters_with_headers_and_fails_the_job() -> None:
    h = harness(raises(Permanent("the batch has no text", code="empty_batch")))
    outcome, delivery = await h.deliver(batch(), TRACE_HEADERS)
    assert isinstance(outcome, DeadLetter)
    dead = h.only(DEAD)
    assert dead.routing_key == routing.DOC_CHUNKED
    assert dead.message_id == "m1"
    assert dead.model(ChunkBatch) == batch()
    assert dead.headers[STAGE_HEADER] == "embed"
    assert dead.headers[ERROR_CODE_HEADER] == "empty_batch"
    assert dead.headers[ATTEMPT_HEADER] == 1
    assert dead.headers[ERROR_HEADER] == "the batch has no text"
    assert dead.headers[JOB_HEADER] == "job1"
    assert dead.headers["traceparent"] == TRACE_HEADERS["traceparent"]
    (event,) = h.events()
    assert event.kind == "failed" and event.error is not None
    assert (event.error.code, event.error.retryable, event.attempt) == ("empty_batch", False, 1)
    assert delivery.acked
    assert h.broker.messages(NEXT_QUEUE) == []
    assert_nothing_retried(h)


@pytest.mark.parametrize("error", [Transient("the index is busy"), RuntimeError("bug")])
@pytest.mark.parametrize(
    ("attempt", "tier", "next_attempt"), [(1, 1, 2), (2, 10, 3), (3, 60, 4), (4, 60, 5)]
)
async def test_failure_waits_in_the_tier_for_its_attempt(
    error: Exception, attempt: int, tier: int, next_attempt: int
) -> None:
    h = harness(raises(error))
    outcome, delivery = await h.deliver(batch(), {**TRACE_HEADERS, ATTEMPT_HEADER: attempt})
    assert isinstance(outcome, Retry)
    parked = h.only(retry_queue(tier))
    assert parked.exchange == ""
    assert parked.headers[ATTEMPT_HEADER] == next_attempt
    assert parked.headers["traceparent"] == TRACE_HEADERS["traceparent"]
    assert parked.model(ChunkBatch) == batch()
    assert sum(len(m) for m in h.retry_tiers().values()) == 1
    assert delivery.acked
    assert h.broker.messages(DEAD) == []
    # The job shows the attempt that failed and why, confirmed before the ack.
    (event,) = h.events()
    assert (event.kind, event.attempt, event.stage) == ("retrying", attempt, "embed")
    assert event.error is not None
    assert (event.error.code, event.error.message, event.error.retryable) == (
        error.code if isinstance(error, Transient) else "internal_error",
        str(error),
        True,
    )
    assert h.broker.journal[-1] == "ack m1"


async def test_last_attempt_dead_letters_as_retryable() -> None:
    h = harness(raises(Transient("the index is busy")))
    outcome, delivery = await h.deliver(batch(), {ATTEMPT_HEADER: MAX_ATTEMPTS})
    assert isinstance(outcome, DeadLetter)
    dead = h.only(DEAD)
    assert dead.headers[ERROR_CODE_HEADER] == "temporarily_unavailable"
    assert dead.headers[ATTEMPT_HEADER] == MAX_ATTEMPTS
    (event,) = h.events()
    assert event.error is not None and event.error.retryable
    assert delivery.acked
    assert_nothing_retried(h)


async def test_a_failing_message_walks_every_tier_then_dead_letters() -> None:
    h = harness(raises(Transient("the index is busy")))
    await h.deliver(batch())
    tiers_taken = []
    while h.broker.messages(DEAD) == []:
        tiers_taken.append(next(d for d, held in h.retry_tiers().items() if held))
        # The tier's TTL passes: the message is back in the stage queue, with its attempt.
        assert h.broker.expire() == 1
        await h.runner.process(h.broker.take(STAGE_QUEUE))
    assert tiers_taken == [1, 10, 60, 60]
    assert h.only(DEAD).headers[ATTEMPT_HEADER] == MAX_ATTEMPTS


async def test_transient_errors_are_retried_in_process_first() -> None:
    behave, calls = failing_first(2, Transient("the model server is warming up"))
    h = harness(behave, transient_retries=2)
    outcome, delivery = await h.deliver(batch())
    assert isinstance(outcome, Done) and len(calls) == 3
    assert delivery.acked
    assert_nothing_retried(h)


async def test_in_process_retries_are_bounded_and_only_for_transient() -> None:
    behave, calls = failing_first(5, Transient("still warming up"))
    h = harness(behave, transient_retries=1)
    outcome, _ = await h.deliver(batch())
    assert isinstance(outcome, Retry) and len(calls) == 2
    behave, calls = failing_first(1, RuntimeError("a bug"))
    outcome, _ = await harness(behave, transient_retries=2).deliver(batch())
    assert isinstance(outcome, Retry) and len(calls) == 1


async def test_delivery_limit_sets_a_crashing_message_aside() -> None:
    calls: list[ChunkBatch] = []

    async def counts(msg: ChunkBatch) -> Sequence[Message]:
        calls.append(msg)
        return await embeds(msg)

    h = harness(counts)
    outcome, delivery = await h.deliver(batch(), {DELIVERY_COUNT_HEADER: DELIVERY_LIMIT})
    assert isinstance(outcome, DeadLetter)
    assert h.only(DEAD).headers[ERROR_CODE_HEADER] == "worker_crashed"
    assert calls == []
    assert delivery.acked
    # One delivery fewer still runs the handler.
    outcome, _ = await h.deliver(batch(), {DELIVERY_COUNT_HEADER: DELIVERY_LIMIT - 1})
    assert isinstance(outcome, Done) and len(calls) == 1


async def test_invalid_message_naming_its_job_dead_letters_and_fails_the_job() -> None:
    h = harness()
    outcome, delivery = await h.deliver(b'{"job_id": "job9", "document_id": "doc9"}')
    assert isinstance(outcome, DeadLetter)
    dead = h.only(DEAD)
    assert dead.headers[ERROR_CODE_HEADER] == "invalid_message"
    assert dead.headers[JOB_HEADER] == "job9"
    assert "ChunkBatch" in dead.headers[ERROR_HEADER]
    (event,) = h.events()
    assert (event.job_id, event.document_id, event.kind) == ("job9", "doc9", "failed")
    assert event.error is not None
    assert (event.error.code, event.error.retryable) == ("invalid_message", False)
    assert delivery.acked


async def test_invalid_message_without_a_job_is_only_dead_lettered() -> None:
    h = harness()
    outcome, delivery = await h.deliver(b"not json at all")
    assert isinstance(outcome, DeadLetter)
    assert h.only(DEAD).headers[ERROR_CODE_HEADER] == "invalid_message"
    assert h.events() == []
    assert delivery.acked


@pytest.mark.parametrize("how", ["refused", "queue_full"])
async def test_refused_output_waits_in_the_first_tier_without_spending_an_attempt(
    how: str,
) -> None:
    if how == "refused":
        h = harness()
        h.broker.refuse(routing.DOC_EMBEDDED)
    else:
        h = harness(queue_max_length=1)
        h.broker.put(NEXT_QUEUE, b"{}")
    outcome, delivery = await h.deliver(batch(), {ATTEMPT_HEADER: 3})
    assert isinstance(outcome, Retry) and not outcome.spend_attempt
    parked = h.only(retry_queue(TIERS[0]))
    assert parked.headers[ATTEMPT_HEADER] == 3
    assert delivery.acked
    assert h.broker.messages(DEAD) == []
    assert all(m.routing_key != routing.DOC_EMBEDDED for m in h.broker.published)


@pytest.mark.parametrize(
    ("behave", "failing"),
    [
        (embeds, routing.DOC_EMBEDDED),
        (raises(Transient("busy")), retry_queue(TIERS[0])),
        (raises(Permanent("bad")), routing.DOC_CHUNKED),
    ],
    ids=["outputs", "retry_tier", "dead_letter"],
)
async def test_publish_failure_mid_message_requeues_without_ack(
    behave: Behaviour, failing: str
) -> None:
    h = harness(behave)
    h.broker.fail(failing, ConnectionError("connection reset by peer"))
    outcome, delivery = await h.deliver(batch())
    assert isinstance(outcome, Requeue)
    assert delivery.requeued and not delivery.acked
    assert "ack m1" not in h.broker.journal
    # RabbitMQ hands it out again, counting the delivery that did not finish.
    again = h.broker.take(STAGE_QUEUE)
    assert again.headers[DELIVERY_COUNT_HEADER] == 1
    assert h.broker.messages(DEAD) == []
    assert_nothing_retried(h)


@pytest.mark.parametrize(
    "changes",
    [{"batch_index": 1}, {"batch_count": 3, "chunks_total": 3}],
    ids=["batch_index", "batch_count"],
)
async def test_outputs_that_break_the_batch_contract_dead_letter(changes: dict[str, Any]) -> None:
    async def renumbers(msg: ChunkBatch) -> Sequence[Message]:
        return [embedded(msg, **changes)]

    h = harness(renumbers)
    outcome, delivery = await h.deliver(batch(0, 2))
    assert isinstance(outcome, DeadLetter) and not outcome.retryable
    dead = h.only(DEAD)
    assert dead.headers[ERROR_CODE_HEADER] == "stage_contract"
    assert "'embed'" in dead.headers[ERROR_HEADER]
    assert h.broker.messages(NEXT_QUEUE) == []
    (event,) = h.events()
    assert event.kind == "failed"
    assert delivery.acked


async def test_outputs_of_another_type_than_declared_break_the_contract() -> None:
    async def passes_on(msg: ChunkBatch) -> Sequence[Message]:
        return [msg]

    h = harness(passes_on)
    outcome, _ = await h.deliver(batch())
    assert isinstance(outcome, DeadLetter) and outcome.code == "stage_contract"
    assert h.broker.messages(NEXT_QUEUE) == []


@pytest.mark.parametrize(("index", "announced"), [(0, True), (1, False)])
async def test_slow_first_batch_announces_started(index: int, announced: bool) -> None:
    async def slowly(msg: ChunkBatch) -> Sequence[Message]:
        await asyncio.sleep(0.01)
        return await embeds(msg)

    h = harness(slowly)
    # Timers fire in order: an announcement due sooner than the handler's end is sent first.
    h.runner.announcer.after_s = 0.001
    await h.deliver(batch(index))
    assert [e.kind for e in h.events()] == (["started", "progress"] if announced else ["progress"])


async def test_quick_handler_sends_no_started_event() -> None:
    h = harness()
    await h.deliver(batch(0))
    await asyncio.sleep(0)
    assert [e.kind for e in h.events()] == ["progress"]


async def test_run_consumes_its_queue_until_stopped() -> None:
    h = harness()
    stop = asyncio.Event()
    running = asyncio.create_task(h.runner.run(stop, drain_timeout_s=1))
    await asyncio.sleep(0)
    consumer = h.broker.consumers[STAGE_QUEUE]
    assert consumer.prefetch == h.runner.tuned.prefetch
    await h.broker.publish(batch(0), routing.DOC_CHUNKED)
    await h.broker.publish(batch(1), routing.DOC_CHUNKED)
    assert await h.broker.drain() == 2
    stop.set()
    await running
    assert [m.model(EmbeddedBatch).batch_index for m in h.broker.messages(NEXT_QUEUE)] == [0, 1]
    assert consumer.closed and STAGE_QUEUE not in h.broker.consumers


class Recording:
    """A layer that keeps every outcome it sees."""

    def __init__(self) -> None:
        self.seen: list[Outcome] = []

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        outcome = await inner(ctx)
        self.seen.append(outcome)
        return outcome


class Exploding:
    """A layer with a bug, before or after the delivery is settled."""

    def __init__(self, *, after: bool) -> None:
        self.after = after

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        if self.after:
            await inner(ctx)
        raise RuntimeError("a layer with a bug")


async def test_an_added_layer_sees_the_outcome_that_was_settled() -> None:
    recording = Recording()
    h = harness(layers=[recording])
    h.broker.refuse(routing.DOC_EMBEDDED)
    outcome, _ = await h.deliver(batch())
    # Decided Done, settled as a retry: layers see what the broker was told.
    assert recording.seen == [outcome]
    assert isinstance(outcome, Retry)


async def test_crash_guard_requeues_what_a_broken_layer_left_unsettled() -> None:
    h = harness(layers=[Exploding(after=False)])
    outcome, delivery = await h.deliver(batch())
    assert isinstance(outcome, Requeue)
    assert delivery.requeued
    assert h.broker.messages(NEXT_QUEUE) == []


async def test_crash_guard_never_settles_a_delivery_twice() -> None:
    h = harness(layers=[Exploding(after=True)])
    outcome, delivery = await h.deliver(batch())
    assert isinstance(outcome, Done)
    assert delivery.acked
    assert h.broker.journal.count("ack m1") == 1 and "requeue m1" not in h.broker.journal


async def test_log_context_names_stage_job_and_document_for_the_handler() -> None:
    seen: dict[str, Any] = {}

    async def looks(msg: ChunkBatch) -> Sequence[Message]:
        seen.update(current_context())
        return await embeds(msg)

    await harness(looks).deliver(batch())
    assert seen == {"stage": "embed", "job_id": "job1", "document_id": "doc1"}
    assert current_context() == {}


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_consumed_and_how_each_ended() -> None:
    consumed = _count("sluice_messages_consumed_total", stage="embed")
    succeeded = _count("sluice_messages_succeeded_total", stage="embed")
    dead = _count("sluice_messages_dead_lettered_total", stage="embed", code="metric_probe")
    retried = _count("sluice_messages_retried_total", stage="embed", code="pipeline_saturated")
    await harness().deliver(batch())
    await harness(raises(Permanent("x", code="metric_probe"))).deliver(batch())
    refused = harness()
    refused.broker.refuse(routing.DOC_EMBEDDED)
    await refused.deliver(batch())
    assert _count("sluice_messages_consumed_total", stage="embed") == consumed + 3
    assert _count("sluice_messages_succeeded_total", stage="embed") == succeeded + 1
    assert (
        _count("sluice_messages_dead_lettered_total", stage="embed", code="metric_probe")
        == dead + 1
    )
    assert (
        _count("sluice_messages_retried_total", stage="embed", code="pipeline_saturated")
        == retried + 1
    )


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of the test's own that keeps finished spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.mark.parametrize("fails", [False, True])
async def test_tracing_names_and_annotates_the_consumer_span(
    spans: tuple[TracerProvider, InMemorySpanExporter], fails: bool
) -> None:
    provider, exporter = spans
    h = harness(raises(Permanent("bad", code="empty_batch")) if fails else embeds)
    # The aio-pika instrumentation opens this span around each delivery in production.
    with provider.get_tracer("test").start_as_current_span("consume"):
        await h.deliver(batch(1, 2))
    (span,) = exporter.get_finished_spans()
    assert span.name == f"{STAGE_QUEUE} process"
    attributes = dict(span.attributes or {})
    assert attributes["messaging.destination.name"] == STAGE_QUEUE
    assert attributes["sluice.job_id"] == "job1"
    assert (attributes["sluice.batch_index"], attributes["sluice.batch_count"]) == (1, 2)
    assert span.status.status_code == (StatusCode.ERROR if fails else StatusCode.UNSET)


@pytest.mark.parametrize("attempt", [1, MAX_ATTEMPTS, MAX_ATTEMPTS + 3])
async def test_a_full_disk_waits_in_the_last_tier_and_is_never_dead_lettered(attempt: int) -> None:
    full = StorageFull("the index at /data/index has no space left to write collection 'c'")
    h = harness(raises(full))
    outcome, delivery = await h.deliver(batch(), {ATTEMPT_HEADER: attempt})
    assert isinstance(outcome, Retry) and not outcome.spend_attempt
    # However often it comes back, it spends no attempt: once there is space, it goes on.
    parked = h.only(retry_queue(TIERS[-1]))
    assert parked.headers[ATTEMPT_HEADER] == attempt
    assert h.broker.messages(DEAD) == []
    assert delivery.acked
    # The job still shows why it waits.
    (event,) = h.events()
    assert (event.kind, event.attempt) == ("retrying", attempt)
    assert event.error is not None
    assert (event.error.code, event.error.message, event.error.retryable) == (
        "storage_full",
        str(full),
        True,
    )
