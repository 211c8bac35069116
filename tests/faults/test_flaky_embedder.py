"""A real pipeline embedding through a remote endpoint that fails: outages are retried until the
job is indexed, rejections fail the job at once with a reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from fakes.embeddings_server import FakeEmbeddingsServer
from invariants import chunks_left_by
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from contracts.messages import chunk_id
from faults.conftest import PipelineFactory
from stages.backends.factory import open_index

pytestmark = pytest.mark.integration

OUTAGE_SENTENCE = "Storm petrels feed by pattering across the waves with their feet."
REJECT_MARKER = "EMBEDDING-REJECT-7F3A"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def flaky_pipeline(
    broker: BrokerHandle, server: FakeEmbeddingsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("flaky-embedder"),
        SLUICE_EMBED_URL=server.url,
        SLUICE_RETRY_DELAYS_S="[1]",
        SLUICE_MAX_ATTEMPTS="6",
        # Every failed request must show as an attempt, not be absorbed by in-process retries.
        SLUICE_TRANSIENT_RETRIES="0",
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
def fake(server: FakeEmbeddingsServer) -> FakeEmbeddingsServer:
    server.reset()
    return server


@pytest.fixture
async def api(flaky_pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=flaky_pipeline.url, timeout=30) as client:
        yield client


async def upload(api: httpx.AsyncClient, name: str, data: bytes, collection: str) -> str:
    """POST one file; returns its job id."""
    answer = await api.post(
        "/v1/documents", files={"file": (name, data)}, data={"collection": collection}
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


async def test_an_embedding_outage_is_retried_until_the_job_is_indexed(
    api: httpx.AsyncClient, fake: FakeEmbeddingsServer
) -> None:
    fake.fail_next(3)
    data = make_markdown("Seabirds", {"Petrels": OUTAGE_SENTENCE})
    job = await wait_for_job(api, await upload(api, "petrels.md", data, "flaky"))
    assert job["status"] == "indexed", job
    assert fake.failed == 3
    # One chunk batch, one request per attempt: three failed attempts, then the one that worked.
    assert job["stages"]["embed"]["attempts"] == 4, job["stages"]
    assert job["stages"]["parse"]["attempts"] == 1

    served = fake.served
    answer = await api.get("/v1/search", params={"q": OUTAGE_SENTENCE, "collection": "flaky"})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["results"]
    assert hits and hits[0]["filename"] == "petrels.md" and OUTAGE_SENTENCE in hits[0]["text"]
    # The gateway embedded the query through the same endpoint.
    assert fake.served == served + 1


async def test_a_rejected_input_fails_the_job_without_retries(
    api: httpx.AsyncClient, fake: FakeEmbeddingsServer
) -> None:
    fake.reject_marker = REJECT_MARKER
    data = make_markdown("Poison", {"Body": f"This chunk carries {REJECT_MARKER} on purpose."})
    job = await wait_for_job(api, await upload(api, "poison.md", data, "flaky"))
    assert job["status"] == "failed", job
    error = job["error"]
    assert (error["stage"], error["code"], error["retryable"]) == (
        "embed",
        "embedding_rejected",
        False,
    )
    assert "HTTP 400" in error["message"] and REJECT_MARKER in error["message"]
    assert job["stages"]["embed"]["attempts"] == 1
    assert fake.rejected == 1


async def test_a_rejected_batch_fails_its_document_and_leaves_none_of_it_searchable(
    pipelines: PipelineFactory, server: FakeEmbeddingsServer, fake: FakeEmbeddingsServer
) -> None:
    # A chunk a message: a document of several chunks is several batches.
    pipeline = pipelines(
        SLUICE_EMBED_URL=server.url, SLUICE_TRANSIENT_RETRIES="0", SLUICE_CHUNKS_PER_MESSAGE="1"
    )
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as api:
        await _a_rejected_batch_leaves_nothing_searchable(api, fake, pipeline)


async def _a_rejected_batch_leaves_nothing_searchable(
    api: httpx.AsyncClient, fake: FakeEmbeddingsServer, pipeline: Pipeline
) -> None:
    fake.reject_marker = REJECT_MARKER
    sections = {
        f"Part {n}": f"Section {n} is about tidal pools and the life in them." for n in range(4)
    }
    sections["Part 2"] += f" It carries {REJECT_MARKER}."
    job_id = await upload(api, "partly.md", make_markdown("Partly", sections), "partial")
    job = await wait_for_job(api, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "embedding_rejected", job
    total = job["progress"]["chunks_total"]
    assert total >= 4, job
    # A chunk a batch: every batch but the rejected one reaches the index, after the job
    # failed as well as before. Once they are all in, none of them may be found.
    index = open_index(pipeline.settings())
    deadline = time.monotonic() + 60
    while index.batches_done("partial", job["document_id"], job_id) < total - 1:
        assert time.monotonic() < deadline, f"the other batches never reached the index: {job}"
        await asyncio.sleep(0.1)
    left = chunks_left_by(index, job)
    assert not left, f"the failed version is half searchable: {left}"
    hits = await api.get("/v1/search", params={"q": "tidal pools", "collection": "partial"})
    assert hits.status_code == 200 and hits.json()["results"] == [], hits.text

    # They are kept, though: a retry of the rejected batch completes the version.
    fake.reject_marker = None
    assert (await api.post(f"/v1/jobs/{job_id}/retry")).status_code == 202
    job = await wait_for_job(api, job_id)
    assert job["status"] == "indexed", job
    mine = {chunk_id(job["document_id"], job["blob_sha256"], i) for i in range(total)}
    assert set(index.chunk_ids("partial", job["document_id"], searchable_only=True)) == mine
