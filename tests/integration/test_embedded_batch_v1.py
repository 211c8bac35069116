"""An embedded batch of version 1 (each chunk with its vector as a JSON list of floats), as the
release before packed vectors queued it, is still indexed after an upgrade: published signed
onto the index stage's queue on a real RabbitMQ, read by the real index stage's runtime and
written to LanceDB, where a search finds it. Without the conversion on the way in it would be
dead-lettered as invalid (the test says which code it got)."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from broker import BrokerHandle

from contracts import routing
from contracts.message_signature import SIGNATURE_HEADER
from contracts.settings import Settings
from contracts.topology import ERROR_CODE_HEADER
from stages.backends.lance_index import LanceIndex
from stages.builtin import index
from stages.infra.broker import Broker
from stages.runtime.runner import StageRunner

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
DIMENSIONS = 384
COLLECTION = "terns"


def at_angle(degrees: float) -> list[float]:
    """A unit vector in the plane of the first two axes."""
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians)] + [0.0] * (DIMENSIONS - 2)


def version_1_body(job: str, document: str) -> bytes:
    """An `EmbeddedBatch` exactly as the old `model_dump_json` wrote it: every field, in its
    order, with `vector` inside each chunk."""
    chunks = [
        {
            "chunk_id": f"{document}-{i}",
            "chunk_index": i,
            "text": text,
            "page": 1,
            "heading": "Migration",
            "keywords": None,
            "vector": at_angle(angle),
        }
        for i, (text, angle) in enumerate(
            [("Arctic terns fly from pole to pole.", 0), ("They live thirty years.", 90)]
        )
    ]
    body: dict[str, Any] = {
        "version": 1,
        "job_id": job,
        "document_id": document,
        "collection": COLLECTION,
        "filename": "terns.md",
        "priority": "interactive",
        "generation": 0,
        "profile": None,
        "batch_index": 0,
        "batch_count": 1,
        "chunks_total": 2,
        "language": None,
        "chunks": chunks,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.fixture
async def settings(broker: BrokerHandle, tmp_path: Path) -> AsyncIterator[Settings]:
    """A namespace of the test's own, removed from the broker after it."""
    settings = Settings(
        amqp_url=broker.amqp_url,
        namespace=f"v1-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "data",
        message_secret="embedded-batch-v1-test-secret",
    )
    yield settings
    cleaner = Broker(settings)
    await cleaner.connect(wait_s=10)
    channel = await cleaner.connection.channel()
    for queue in cleaner.topology.queues:
        await channel.queue_delete(queue.name)
    for exchange in cleaner.topology.exchanges:
        await channel.exchange_delete(exchange.name)
    await cleaner.close()


async def dead_letter_codes(broker: Broker) -> list[str]:
    """The error codes of the namespace's dead letters (taken off the queue)."""
    channel = await broker.connection.channel()
    queue = await channel.get_queue(routing.dead_letter_queue(broker.settings.namespace))
    codes = []
    while (letter := await queue.get(fail=False, no_ack=True)) is not None:
        codes.append(str((letter.headers or {}).get(ERROR_CODE_HEADER)))
    await channel.close()
    return codes


async def test_a_version_1_batch_on_the_index_queue_is_indexed_and_searchable(
    settings: Settings, tmp_path: Path
) -> None:
    lance = LanceIndex(tmp_path / "index")
    broker = Broker(settings)
    await broker.connect(wait_s=10)
    stop = asyncio.Event()
    ctx = index.context_for(lance, max_batches=4, max_wait_s=0)
    running = asyncio.create_task(
        StageRunner(index.STAGE, ctx, settings, broker).run(stop, drain_timeout_s=5)
    )
    try:
        body = version_1_body("oldjob", "olddoc")
        # Straight onto the index stage's queue, signed for its topic as the old embed
        # stage signed it.
        await broker.publish_raw(
            "",
            routing.stage_queue(settings.namespace, "index"),
            body,
            headers={SIGNATURE_HEADER: broker.signer.sign(routing.DOC_EMBEDDED, body)},
        )
        async with asyncio.timeout(DEADLINE_S):
            while lance.chunk_count(COLLECTION) < 2:
                assert await dead_letter_codes(broker) == []
                await asyncio.sleep(0.1)
        hits = lance.search(COLLECTION, at_angle(80), k=2)
        assert [h.chunk_id for h in hits] == ["olddoc-1", "olddoc-0"]
        assert hits[0].text == "They live thirty years."
        assert lance.batches_done(COLLECTION, "olddoc", "oldjob") == 1
    finally:
        stop.set()
        await running
        await broker.close()
