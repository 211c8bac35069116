"""A client that can publish to the exchange but does not hold the deployment's message secret
cannot make the pipeline do anything: a forged upload of another tenant's blob, a forged last
batch that would wipe a document's chunks and a replay of either are dead-lettered unread
(`unauthenticated_message`). What a Sluice process signs is still checked field by field: a
signed upload naming its blob by a path, or a job event naming one, is refused, and a
document's DELETE still completes. Everything is published by an independent AMQP client
(amqp-tools), the way an intruder on the broker would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from invariants import dead_letters
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from contracts import routing
from contracts.message_signature import UNAUTHENTICATED, MessageSigner
from contracts.messages import Chunk, DocumentUploaded, EmbeddedBatch, PackedVectors
from faults.test_malformed_messages import amqp_publish
from stages.backends.factory import open_index

SECRET = "forged-messages-test-secret"
# The packaged model's vectors, so a forged batch is one the index would have taken.
DIMENSIONS = 384
DEADLINE_S = 60.0
LetterCount = Counter[tuple[str | None, str]]


@pytest.fixture(scope="module")
def forged_pipeline(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """One pipeline for the module, with a message secret the tests know; small chunks, so
    a document is several of them."""
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("forged"),
        SLUICE_MESSAGE_SECRET=SECRET,
        SLUICE_CHUNK_MAX_TOKENS="24",
        SLUICE_CHUNK_OVERLAP_TOKENS="0",
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(forged_pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's gateway."""
    async with httpx.AsyncClient(base_url=forged_pipeline.url, timeout=60) as client:
        yield client


async def indexed(
    api: httpx.AsyncClient, collection: str, title: str
) -> tuple[dict[str, Any], str]:
    """Upload one note to `collection` and follow it to the end; returns its job and the
    sha256 of its bytes (its name in the blob store)."""
    data = make_markdown(
        title,
        {
            "Where": f"{title} keep their records in the lighthouse cellar.",
            "When": f"{title} open the ledgers only on the first frost of winter.",
        },
    )
    answer = await api.post(
        "/v1/documents", files={"file": (f"{title}.md", data)}, data={"collection": collection}
    )
    assert answer.status_code == 202, answer.text
    job = await wait_for_job(api, answer.json()["job_id"])
    assert job["status"] == "indexed", job
    return job, hashlib.sha256(data).hexdigest()


async def letters(pipeline: Pipeline) -> LetterCount:
    """The dead letters, counted by stage and code."""
    return Counter((letter.stage, letter.code) for letter in await dead_letters(pipeline))


async def until_letters(pipeline: Pipeline, expected: LetterCount) -> None:
    """Wait, with a deadline, until the dead-letter queue holds exactly `expected`."""
    deadline = time.monotonic() + DEADLINE_S
    while (found := await letters(pipeline)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"dead letters {dict(found)}, expected {dict(expected)}")
        await asyncio.sleep(0.2)


def publish(pipeline: Pipeline, key: str, body: bytes, signer: MessageSigner | None) -> None:
    """Publish to the pipeline's exchange, signed by `signer` for `key`, or not at all."""
    amqp_publish(
        pipeline,
        body,
        exchange=routing.exchange(pipeline.namespace),
        routing_key=key,
        signature=signer.sign(key, body) if signer else None,
    )


async def test_a_forged_upload_of_another_tenants_blob_copies_nothing(
    forged_pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    job, sha = await indexed(api, "tenant-b", "Keepers")
    index = open_index(forged_pipeline.settings())
    theirs = sorted(index.chunk_ids("tenant-b", job["document_id"]))
    assert len(theirs) == job["progress"]["chunks_total"] >= 2
    before = await letters(forged_pipeline)

    stolen = uuid.uuid4().hex
    forged = DocumentUploaded(
        job_id=uuid.uuid4().hex,
        document_id=stolen,
        collection="tenant-a",
        filename="stolen.md",
        blob_sha256=sha,
        content_type="text/markdown",
        size_bytes=100,
    ).model_dump_json()
    publish(forged_pipeline, routing.DOC_UPLOADED, forged.encode(), None)
    publish(forged_pipeline, routing.DOC_UPLOADED, forged.encode(), MessageSigner("guessed"))

    await until_letters(forged_pipeline, before + Counter({("parse", UNAUTHENTICATED): 2}))
    assert index.chunk_ids("tenant-a", stolen) == []
    found = await api.get("/v1/search", params={"q": "lighthouse cellar", "collection": "tenant-a"})
    assert found.json()["results"] == []
    assert sorted(index.chunk_ids("tenant-b", job["document_id"])) == theirs
    assert (await api.get(f"/v1/jobs/{job['job_id']}")).json()["status"] == "indexed"


async def test_a_forged_last_batch_leaves_a_documents_chunks_alone(
    forged_pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    job, _ = await indexed(api, "tenant-c", "Wardens")
    index = open_index(forged_pipeline.settings())
    theirs = sorted(index.chunk_ids("tenant-c", job["document_id"]))
    assert len(theirs) >= 2
    before = await letters(forged_pipeline)

    # Had the index believed it, this one-batch "new version" would replace every chunk.
    chunk = Chunk(chunk_id=uuid.uuid4().hex, chunk_index=0, text="nothing")
    forged = EmbeddedBatch(
        job_id=uuid.uuid4().hex,
        document_id=job["document_id"],
        collection="tenant-c",
        filename="Wardens.md",
        batch_index=0,
        batch_count=1,
        chunks_total=1,
        chunks=[chunk],
        vectors=PackedVectors.pack([[0.0] * DIMENSIONS]),
    ).model_dump_json()
    publish(forged_pipeline, routing.DOC_EMBEDDED, forged.encode(), None)

    await until_letters(forged_pipeline, before + Counter({("index", UNAUTHENTICATED): 1}))
    assert sorted(index.chunk_ids("tenant-c", job["document_id"])) == theirs
    found = await api.get("/v1/search", params={"q": "first frost", "collection": "tenant-c"})
    assert {hit["chunk_id"] for hit in found.json()["results"]} <= set(theirs)


async def test_replaying_a_forged_letter_does_not_make_it_trusted(
    forged_pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    _, sha = await indexed(api, "tenant-f", "Ferrymen")
    before = await letters(forged_pipeline)
    stolen = uuid.uuid4().hex
    forged = DocumentUploaded(
        job_id=uuid.uuid4().hex,
        document_id=stolen,
        collection="tenant-e",
        filename="stolen.md",
        blob_sha256=sha,
        content_type="text/markdown",
        size_bytes=100,
    ).model_dump_json()
    publish(forged_pipeline, routing.DOC_UPLOADED, forged.encode(), None)
    held = before + Counter({("parse", UNAUTHENTICATED): 1})
    await until_letters(forged_pipeline, held)

    replayed = await api.post("/v1/dead-letters/replay", json={"stage": "parse"})
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed"] == sum(n for (s, _), n in held.items() if s == "parse")
    # Sent back as it came, unsigned: refused again, unread, and nothing was indexed.
    await until_letters(forged_pipeline, held)
    assert open_index(forged_pipeline.settings()).chunk_ids("tenant-e", stolen) == []


async def test_a_signed_upload_naming_its_blob_by_a_path_is_an_invalid_message(
    forged_pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    before = await letters(forged_pipeline)
    body = json.dumps(
        {
            "version": 1,
            "job_id": uuid.uuid4().hex,
            "document_id": uuid.uuid4().hex,
            "collection": "default",
            "filename": "passwd",
            "blob_sha256": "../../../../etc/passwd",
            "content_type": "text/plain",
            "size_bytes": 10,
        }
    ).encode()
    # As a Sluice process with a bug would send it: signed with the deployment's secret.
    publish(forged_pipeline, routing.DOC_UPLOADED, body, MessageSigner(SECRET))
    await until_letters(forged_pipeline, before + Counter({("parse", "invalid_message"): 1}))
    reasons = [
        letter.reason
        for letter in await dead_letters(forged_pipeline)
        if letter.code == "invalid_message"
    ]
    assert any("blob_sha256" in reason for reason in reasons), reasons


async def test_a_job_event_naming_a_path_is_refused_and_the_delete_still_completes(
    forged_pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    job, sha = await indexed(api, "tenant-d", "Pilots")
    event = {
        "version": 1,
        "job_id": job["job_id"],
        "document_id": job["document_id"],
        "stage": "parse",
        "kind": "progress",
        "parsed_sha256": "../../x",
    }
    key = routing.job_event_key("parse", "progress")
    publish(forged_pipeline, key, json.dumps(event).encode(), MessageSigner(SECRET))
    # The tracker reads its queue in order: once a later job is indexed, the event was read.
    await indexed(api, "tenant-d2", "Boatmen")
    log = (forged_pipeline.log_dir / "gateway.log").read_text(errors="replace")
    assert "dropping an invalid job event" in log and "parsed_sha256" in log

    answer = await api.delete(f"/v1/documents/{job['document_id']}")
    assert answer.status_code == 204, answer.text
    assert open_index(forged_pipeline.settings()).chunk_ids("tenant-d", job["document_id"]) == []
    blob = forged_pipeline.data_dir / "blobs" / sha[:2] / sha
    assert not blob.exists()
    assert (await api.get("/v1/collections/tenant-d")).status_code == 404
