"""Messages between Sluice processes are signed, and every consumer checks before it reads:
the signer itself, the secret, the stage runtime on the broker double, the tracker and the
pipeline monitor. What only a real broker shows (TTL tiers keep headers, replay) is in
tests/faults/test_forged_messages.py and tests/faults/test_replay.py."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from contracts import pipeline, routing
from contracts.errors import Transient
from contracts.events import JobEvent, WorkerHeartbeat
from contracts.message_signature import SIGNATURE_HEADER, UNAUTHENTICATED, MessageSigner
from contracts.messages import Chunk, ChunkBatch, EmbeddedBatch, Message, PackedVectors
from contracts.settings import Settings
from contracts.topology import ERROR_CODE_HEADER, JOB_HEADER
from gateway.http.pipeline_monitor import PipelineMonitor
from gateway.http.services import JobChanges
from gateway.store.base import JobStore, NewJob
from gateway.store.job_store import SqliteJobStore
from gateway.store.tracker import Tracker
from stages.infra.signing import SECRET_FILE, message_secret
from stages.runtime.memory_broker import MemoryBroker, MemoryDelivery
from stages.runtime.outcome import DeadLetter, Done, Outcome
from stages.runtime.runner import StageRunner
from stages.stage import Stage

NS = "t"
EMBED_QUEUE = routing.stage_queue(NS, "embed")
INDEX_QUEUE = routing.stage_queue(NS, "index")
TRACKER = routing.tracker_queue(NS)
DEAD = routing.dead_letter_queue(NS)
JOB = "0123456789abcdef0123456789abcdef"
DOC = "fedcba9876543210fedcba9876543210"


# --- the signer -------------------------------------------------------------------------------


def test_a_signature_holds_for_its_topic_and_body_only() -> None:
    signer = MessageSigner("deployment secret")
    body = b'{"job_id": "j1"}'
    signature = signer.sign("doc.parsed", body)
    assert signature.startswith("v1=") and len(signature) == 3 + 64
    assert signer.verify("doc.parsed", body, signature)
    assert not signer.verify("doc.chunked", body, signature)
    assert not signer.verify("doc.parsed", body + b" ", signature)
    assert not MessageSigner("another secret").verify("doc.parsed", body, signature)
    # Topic and body are kept apart: moving a byte from one to the other changes the MAC.
    assert not signer.verify("doc.parse", b"d" + body, signature)


@pytest.mark.parametrize(
    "header",
    [None, "", "v1=", "sha256=" + "0" * 64, "v1=" + "0" * 64, 42, "v1=é" * 30, b"\xff\xfe"],
)
def test_any_other_header_is_no_signature(header: object) -> None:
    signer = MessageSigner("deployment secret")
    assert not signer.verify("doc.parsed", b"{}", header)


def test_a_signature_read_back_as_bytes_still_verifies() -> None:
    signer = MessageSigner("deployment secret")
    signature = signer.sign("job.parse.started", b"{}")
    assert signer.verify("job.parse.started", b"{}", signature.encode())
    assert signer.verify_headers("job.parse.started", b"{}", {SIGNATURE_HEADER: signature})
    assert not signer.verify_headers("job.parse.started", b"{}", None)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        MessageSigner("")


# --- the secret -------------------------------------------------------------------------------


def test_without_a_setting_every_process_on_one_disk_shares_one_kept_secret(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    first = message_secret(settings)
    assert message_secret(Settings(data_dir=tmp_path)) == first
    kept = tmp_path / SECRET_FILE
    assert kept.read_text().strip() == first and len(first) == 64
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert message_secret(Settings(data_dir=tmp_path, message_secret="set")) == "set"


def test_shared_stores_without_the_setting_warn_that_machines_will_disagree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        message_secret(Settings(data_dir=tmp_path, job_store_url="postgresql://db/sluice"))
    assert "SLUICE_MESSAGE_SECRET is not set" in caplog.text


# --- the stage runtime, on the broker double ------------------------------------------------


async def _startup(settings: Settings) -> None:
    return None


calls: list[ChunkBatch] = []


async def _handle(msg: ChunkBatch, ctx: Any) -> Sequence[Message]:
    calls.append(msg)
    if ctx == "fail":
        raise Transient("the model server is busy")
    vectors = PackedVectors.pack([[1.0, 0.0] for _ in msg.chunks], 2)
    fields = msg.model_dump(exclude={"chunks", "version"})
    return [EmbeddedBatch(**fields, chunks=msg.chunks, vectors=vectors)]


STAGE: Stage[ChunkBatch, Any] = Stage(spec=pipeline.EMBED, startup=_startup, handle=_handle)


def batch() -> ChunkBatch:
    chunk = Chunk(chunk_id="c0", chunk_index=0, text="terns migrate")
    return ChunkBatch(
        job_id=JOB,
        document_id=DOC,
        collection="default",
        filename="terns.pdf",
        batch_index=0,
        batch_count=1,
        chunks_total=1,
        chunks=[chunk],
    )


def runner(ctx: Any = None, **settings: Any) -> tuple[MemoryBroker, StageRunner]:
    tuned = Settings(namespace=NS, transient_retries=0, retry_delays_s=(1,), **settings)
    broker = MemoryBroker(tuned)
    calls.clear()
    return broker, StageRunner(STAGE, ctx, tuned, broker)


async def deliver(
    broker: MemoryBroker, stage: StageRunner, body: bytes, **put: Any
) -> tuple[Outcome, MemoryDelivery]:
    broker.put(EMBED_QUEUE, body, routing_key=routing.DOC_CHUNKED, message_id="m1", **put)
    delivery = broker.take(EMBED_QUEUE)
    return await stage.process(delivery), delivery


def forged(signer: MessageSigner | None, topic: str = routing.DOC_CHUNKED) -> dict[str, Any]:
    """`put` arguments for a body signed by `signer` for `topic`, or not signed at all."""
    body = batch().model_dump_json().encode()
    headers = {SIGNATURE_HEADER: signer.sign(topic, body)} if signer else {}
    return {"body": body, "headers": headers, "signed": False}


@pytest.mark.parametrize(
    "signer",
    [None, MessageSigner("another deployment's secret")],
    ids=["unsigned", "another secret"],
)
async def test_a_message_not_signed_with_the_secret_is_dead_lettered_unread(
    signer: MessageSigner | None,
) -> None:
    broker, stage = runner()
    given = forged(signer)
    outcome, delivery = await deliver(broker, stage, given.pop("body"), **given)
    assert isinstance(outcome, DeadLetter) and outcome.code == UNAUTHENTICATED
    assert not outcome.retryable and delivery.acked
    assert calls == []
    (letter,) = broker.messages(DEAD)
    assert letter.headers[ERROR_CODE_HEADER] == UNAUTHENTICATED
    # Nothing it says is believed: it names a job, but fails none and is no one's letter.
    assert letter.headers[JOB_HEADER] == ""
    assert broker.messages(TRACKER) == [] and broker.messages(INDEX_QUEUE) == []


async def test_a_message_signed_for_another_topic_is_dead_lettered_unread() -> None:
    broker, stage = runner()
    given = forged(broker.signer, topic=routing.DOC_UPLOADED)
    outcome, _ = await deliver(broker, stage, given.pop("body"), **given)
    assert isinstance(outcome, DeadLetter) and outcome.code == UNAUTHENTICATED
    assert calls == []


async def test_a_signed_message_is_handled_and_its_outputs_signed_for_their_topic() -> None:
    broker, stage = runner()
    outcome, _ = await deliver(broker, stage, batch().model_dump_json().encode())
    assert isinstance(outcome, Done) and len(calls) == 1
    (out,) = broker.messages(INDEX_QUEUE)
    assert broker.signer.verify_headers(routing.DOC_EMBEDDED, out.body, out.headers)
    (event,) = broker.messages(TRACKER)
    assert broker.signer.verify_headers("job.embed.progress", event.body, event.headers)


async def test_a_signed_message_with_an_invalid_field_is_an_invalid_message() -> None:
    broker, stage = runner()
    body = batch().model_dump(mode="json")
    body["chunks"][0]["chunk_id"] = "../../etc/passwd"
    outcome, _ = await deliver(broker, stage, json.dumps(body).encode())
    assert isinstance(outcome, DeadLetter) and outcome.code == "invalid_message"
    assert "chunk_id" in outcome.reason
    # Signed, so its well-formed job id is believed: that job fails.
    (event,) = [m.model(JobEvent) for m in broker.messages(TRACKER)]
    assert (event.job_id, event.kind, event.error and event.error.code) == (
        JOB,
        "failed",
        "invalid_message",
    )


async def test_a_broken_body_naming_a_malformed_job_id_fails_no_job() -> None:
    broker, stage = runner()
    outcome, _ = await deliver(broker, stage, b'{"job_id": "../x", "document_id": "../y"}')
    assert isinstance(outcome, DeadLetter) and outcome.code == "invalid_message"
    assert broker.messages(TRACKER) == []
    (letter,) = broker.messages(DEAD)
    assert letter.headers[JOB_HEADER] == ""


async def test_a_retry_and_a_dead_letter_carry_the_signature_the_message_came_with() -> None:
    broker, stage = runner("fail", max_attempts=2)
    body = batch().model_dump_json().encode()
    await deliver(broker, stage, body)
    (waiting,) = broker.messages(routing.retry_queue(NS, "embed", 1))
    signature = broker.signer.sign(routing.DOC_CHUNKED, body)
    assert waiting.headers[SIGNATURE_HEADER] == signature
    await stage.broker.consume(EMBED_QUEUE, 1, stage._receiver(routing.INTERACTIVE))
    assert broker.expire() == 1
    await broker.drain()
    # Back from the tier, it was read (and failed its last attempt), not refused.
    assert len(calls) == 2
    (letter,) = broker.messages(DEAD)
    assert letter.headers[ERROR_CODE_HEADER] == "temporarily_unavailable"
    assert letter.headers[SIGNATURE_HEADER] == signature


# --- the gateway's consumers ------------------------------------------------------------------


class TrackerDelivery:
    """A tracker delivery double: body, routing key, headers, and whether it was acked."""

    def __init__(self, event: JobEvent, signer: MessageSigner | None) -> None:
        self.body = event.model_dump_json().encode()
        self.routing_key = event.routing_key
        self.headers = (
            {SIGNATURE_HEADER: signer.sign(self.routing_key, self.body)} if signer else {}
        )
        self.acked = asyncio.Event()

    async def ack(self) -> None:
        """The tracker settled it."""
        self.acked.set()


async def test_the_tracker_folds_only_events_signed_with_the_secret(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    jobs = [f"{n:032x}" for n in range(3)]
    for job in jobs:
        new = NewJob(job, job, "default", "a.pdf", "application/pdf", 1, job * 2)
        assert store.create(new) is None
    signer = MessageSigner("deployment secret")
    broker = SimpleNamespace(signer=signer)
    tracker = Tracker(cast(Any, broker), cast(JobStore, store), JobChanges())
    started = [JobEvent(job_id=j, document_id=j, stage="parse", kind="started") for j in jobs]
    deliveries = [
        TrackerDelivery(started[0], None),
        TrackerDelivery(started[1], MessageSigner("another secret")),
        TrackerDelivery(started[2], signer),
    ]
    try:
        await tracker._fold(cast(Any, deliveries))
        statuses = [found.status for j in jobs if (found := store.get(j)) is not None]
        assert statuses == ["queued", "queued", "parsing"]
        # Dropped, not left to come back: an unsigned event can never be folded.
        assert all(d.acked.is_set() for d in deliveries)
    finally:
        store.close()


class HeartbeatDelivery:
    """A heartbeat as the monitor's consumer hands it over."""

    def __init__(self, beat: WorkerHeartbeat, signer: MessageSigner | None) -> None:
        self.body = beat.model_dump_json().encode()
        self.routing_key = beat.routing_key
        self.headers = (
            {SIGNATURE_HEADER: signer.sign(self.routing_key, self.body)} if signer else {}
        )


async def test_the_monitor_hears_only_heartbeats_signed_with_the_secret() -> None:
    signer = MessageSigner("deployment secret")
    settings = Settings(namespace=NS)
    monitor = PipelineMonitor(cast(Any, SimpleNamespace(signer=signer)), settings)

    def beat(worker: str, job: str) -> WorkerHeartbeat:
        now = datetime.now(UTC)
        return WorkerHeartbeat(
            worker_id=worker,
            stage="parse",
            host="h",
            pid=1,
            sluice_version="test",
            started_at=now,
            every_s=5.0,
            in_hand_jobs=[job],
        )

    await monitor._on_heartbeat(cast(Any, HeartbeatDelivery(beat("w1", "forged"), None)))
    other = MessageSigner("another secret")
    await monitor._on_heartbeat(cast(Any, HeartbeatDelivery(beat("w2", "also-forged"), other)))
    await monitor._on_heartbeat(cast(Any, HeartbeatDelivery(beat("w3", "real"), signer)))
    assert monitor.in_hand_jobs() == {"real"}
