"""A real pipeline embedding through a remote endpoint that fails: outages are retried until the
job is indexed, rejections fail the job at once with a reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from fakes.embeddings_server import FakeEmbeddingsServer
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

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
