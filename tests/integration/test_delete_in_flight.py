"""A delete wins over work still in the pipeline, on a real broker with the real stages.

The stage that would race the delete is stopped while the document's messages queue up in
front of it, and started again only after DELETE answered: every late message then meets a
deleted document, whatever this machine's speed, and must end cleanly (acked once, no retry,
no dead letter) leaving nothing of the document behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from invariants import dead_letters
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from stages.backends.factory import open_index

COLLECTION = "deleting"
SECTIONS = {
    "Harbour": "The harbour master logs every trawler that enters before dawn.",
    "Lighthouse": "The lighthouse keeper trims the wick of the great lamp each dusk.",
    "Market": "The fish market opens at four, when the first boats are unloaded.",
    "Chapel": "Sailors' names are carved on the chapel wall above the tide line.",
    "Foundry": "The old foundry cast anchors and chain for the whole coast.",
    "Ropewalk": "In the ropewalk, hemp was twisted into hawsers a furlong long.",
}


@pytest.fixture(scope="module")
def pipeline(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline of this module's own (its stages are stopped and started), with batches of
    two chunks, so every document here is several batches."""
    running = start_pipeline(
        broker, tmp_path_factory.mktemp("delete-in-flight"), SLUICE_CHUNKS_PER_MESSAGE="2"
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


# `api` (tests/integration/conftest.py) is a client of this module's pipeline.


async def wait_until(
    api: httpx.AsyncClient, job_id: str, holds: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The job once `holds` is true of it (its record is read until then, with a deadline)."""
    deadline = time.monotonic() + 180
    while True:
        job: dict[str, Any] = (await api.get(f"/v1/jobs/{job_id}")).json()
        if holds(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never {what}: {job}"
        await asyncio.sleep(0.1)


def finished(stage: str) -> Callable[[dict[str, Any]], bool]:
    """Whether every message of the job went through `stage` (its last one acked)."""
    return lambda job: bool(job["stages"].get(stage, {}).get("finished_at"))


async def upload(api: httpx.AsyncClient, name: str, sections: dict[str, str]) -> dict[str, Any]:
    """Upload a Markdown document into the collection; its 202 body."""
    answer = await api.post(
        "/v1/documents",
        files={"file": (name, make_markdown(name, sections))},
        data={"collection": COLLECTION},
    )
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def assert_gone(pipeline: Pipeline, api: httpx.AsyncClient, document_id: str) -> None:
    """Nothing of the document is found, stored, retried or dead-lettered, and deleting it
    again answers as the first time did."""
    for text in SECTIONS.values():
        found = await api.get("/v1/search", params={"q": text, "collection": COLLECTION, "k": 20})
        assert found.status_code == 200, found.text
        assert [r for r in found.json()["results"] if r["document_id"] == document_id] == []
    index = open_index(pipeline.settings())
    assert index.chunk_ids(COLLECTION, document_id) == []
    assert index.is_deleted(COLLECTION, document_id)
    assert await dead_letters(pipeline) == []
    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204
    again = await api.put(
        f"/v1/documents/{document_id}", files={"file": ("again.md", b"# Again\n\nback?")}
    )
    assert again.status_code == 404 and again.json()["error"]["code"] == "document_not_found"


def assert_ended_by_the_delete(job: dict[str, Any]) -> None:
    """The job ended when its document was deleted, and nothing it did after changed that."""
    assert job["status"] == "failed", job
    assert (job["error"]["code"], job["error"]["retryable"]) == ("document_deleted", False)


async def test_late_batches_of_a_deleted_document_are_dropped_by_the_index(
    pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    assert pipeline.terminate("index") == 0
    body = await upload(api, "harbour.md", SECTIONS)
    job_id, document_id = body["job_id"], body["document_id"]
    # Embedded: every batch waits in front of the stopped index stage.
    job = await wait_until(api, job_id, finished("embed"), "was embedded")
    assert job["progress"]["chunks_total"] >= 5, "the document must be several batches"
    assert job["progress"]["chunks_indexed"] == 0

    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204
    assert_ended_by_the_delete((await api.get(f"/v1/jobs/{job_id}")).json())

    pipeline.start("index")
    job = await wait_until(api, job_id, finished("index"), "had every batch indexed")
    assert_ended_by_the_delete(job)
    # Each batch acked at its first try: a retried one reports its second attempt.
    assert job["stages"]["index"]["attempts"] == 1
    await assert_gone(pipeline, api, document_id)


async def test_a_document_deleted_right_after_its_upload_is_never_parsed(
    pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    assert pipeline.terminate("parse") == 0
    body = await upload(api, "lighthouse.md", SECTIONS)
    job_id, document_id = body["job_id"], body["document_id"]
    # Its upload's blob goes with it while doc.uploaded still waits for parse.
    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204

    pipeline.start("parse")
    job = await wait_until(api, job_id, finished("parse"), "went through parse")
    assert_ended_by_the_delete(job)
    assert job["stages"]["parse"]["attempts"] == 1  # no retry of a blob that is gone
    assert set(job["stages"]) == {"parse"}  # nothing went on to chunk
    retry = await api.post(f"/v1/jobs/{job_id}/retry")
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "document_deleted"
    await assert_gone(pipeline, api, document_id)


async def test_a_new_version_in_flight_does_not_bring_a_deleted_document_back(
    pipeline: Pipeline, api: httpx.AsyncClient
) -> None:
    first = await upload(api, "market.md", dict(list(SECTIONS.items())[:2]))
    document_id = first["document_id"]
    assert (await wait_for_job(api, first["job_id"]))["status"] == "indexed"

    assert pipeline.terminate("index") == 0
    new_version = {"file": ("market.md", make_markdown("market.md", SECTIONS))}
    second = await api.put(f"/v1/documents/{document_id}", files=new_version)
    assert second.status_code == 202, second.text
    job_id = second.json()["job_id"]
    await wait_until(api, job_id, finished("embed"), "was embedded")
    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204

    # Once every batch of the new version is in, the index would swap versions.
    pipeline.start("index")
    job = await wait_until(api, job_id, finished("index"), "had every batch indexed")
    assert_ended_by_the_delete(job)
    assert job["stages"]["index"]["attempts"] == 1
    # The first version's job stays as history: it was indexed, then its document deleted.
    assert (await api.get(f"/v1/jobs/{first['job_id']}")).json()["status"] == "indexed"
    await assert_gone(pipeline, api, document_id)
