"""`POST/DELETE /v1/collections/{c}/reindex` and the collection's generation fields, on a
real gateway app (no broker: what these answer comes from the job store; the monitor that
moves a reindex on waits for a broker that never comes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contracts.events import JobError, JobEvent
from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.store.base import NewJob, open_job_store

ROOT = {"Authorization": "Bearer root"}
RED_ONLY = {"Authorization": "Bearer red-only"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A gateway with two keys and one document in `books`."""
    settings = Settings(
        data_dir=tmp_path,
        amqp_url="amqp://guest:guest@127.0.0.1:1/",
        api_keys="root,red-only:red",
    )
    store = open_job_store(settings)
    job = NewJob("u1", "d1", "books", "a.txt", "text/plain", 3, "b" * 64)
    assert store.create(job) is None
    return settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of the gateway."""
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


def post(client: TestClient, body: Any, collection: str = "books", **kw: Any) -> Any:
    """POST a reindex; the answer."""
    headers = kw.pop("headers", ROOT)
    return client.post(f"/v1/collections/{collection}/reindex", json=body, headers=headers, **kw)


def code(answer: Any) -> tuple[int, str]:
    """(status, error code) of an error answer."""
    return answer.status_code, answer.json()["error"]["code"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "invalid_reindex"),
        ({"chunk_max_tokens": 128, "colour": "red"}, "invalid_reindex"),
        ({"chunk_max_tokens": 8}, "invalid_reindex"),
        ({"chunk_max_tokens": 16, "chunk_overlap_tokens": 8}, "invalid_profile"),
        ({"model": "relative/dir"}, "unknown_model"),
        ({"model": "/no/such/model"}, "unknown_model"),
        ([1, 2], "invalid_reindex"),
    ],
)
def test_settings_that_cannot_be_built_are_refused(
    client: TestClient, body: Any, expected: str
) -> None:
    assert code(post(client, body)) == (422, expected)
    # Nothing was recorded: the collection is not being re-indexed.
    assert client.get("/v1/collections/books", headers=ROOT).json()["reindex"] is None
    assert code(client.get("/v1/collections/books/reindex", headers=ROOT)) == (404, "no_reindex")


def test_what_is_no_json_or_no_collection_is_refused(client: TestClient) -> None:
    answer = client.post("/v1/collections/books/reindex", content=b"{", headers=ROOT)
    assert code(answer) == (400, "invalid_request")
    assert code(post(client, {"chunk_max_tokens": 128}, "empty")) == (404, "collection_not_found")
    assert code(post(client, {"chunk_max_tokens": 128}, "Not%20Valid")) == (
        400,
        "invalid_collection",
    )
    assert code(post(client, {"chunk_max_tokens": 128}, headers=RED_ONLY)) == (
        403,
        "collection_forbidden",
    )
    assert code(client.delete("/v1/collections/books/reindex", headers=RED_ONLY)) == (
        403,
        "collection_forbidden",
    )
    assert post(client, {"chunk_max_tokens": 128}, headers={}).status_code == 401


def test_a_reindex_starts_once_shows_on_its_collection_and_cancels(
    client: TestClient, settings: Settings
) -> None:
    answer = post(client, {"chunk_max_tokens": 128})
    assert answer.status_code == 202, answer.text
    started = answer.json()
    assert started["state"] == "running"
    assert (started["generation"], started["from_generation"]) == (1, 0)
    assert started["settings"] == {
        "chunk_max_tokens": 128,
        "chunk_overlap_tokens": settings.chunk_overlap_tokens,
        "model": settings.embed_model_name,
    }
    assert answer.headers["location"] == started["status_url"] == "/v1/collections/books/reindex"
    assert started["status"] == "running"
    assert code(post(client, {"chunk_max_tokens": 96})) == (409, "reindex_in_progress")

    books = client.get("/v1/collections/books", headers=ROOT).json()
    assert books["generation"]["number"] == 0
    assert books["generation"]["chunk_max_tokens"] == settings.chunk_max_tokens
    assert books["reindex"]["reindex_id"] == started["reindex_id"]
    assert books["reindex"]["status"] == "running"
    current = client.get("/v1/collections/books/reindex", headers=ROOT).json()
    assert current == books["reindex"]
    listed = client.get("/v1/collections", headers=ROOT).json()["collections"]
    assert [c["reindex"]["reindex_id"] for c in listed] == [started["reindex_id"]]

    cancelled = client.delete("/v1/collections/books/reindex", headers=ROOT)
    assert cancelled.status_code == 200
    assert (cancelled.json()["reindex_id"], cancelled.json()["status"]) == (
        started["reindex_id"],
        "cancelled",
    )
    assert code(client.delete("/v1/collections/books/reindex", headers=ROOT)) == (
        404,
        "no_reindex",
    )
    after = client.get("/v1/collections/books", headers=ROOT).json()
    assert (after["generation"]["number"], after["reindex"]["status"]) == (0, "cancelled")
    # A new one may start now, into a generation never used before.
    assert post(client, {"model": settings.embed_model_name}).json()["generation"] == 2


def test_a_reindex_job_is_not_retried_on_its_own(client: TestClient, settings: Settings) -> None:
    store = open_job_store(settings)
    parsed = "a" * 64
    for event in (
        JobEvent(
            job_id="u1", document_id="d1", stage="parse", kind="progress", parsed_sha256=parsed
        ),
        JobEvent(job_id="u1", document_id="d1", stage="index", kind="progress"),
    ):
        store.apply(event)
    post(client, {"chunk_max_tokens": 128})
    reindex = store.active_reindex("books")
    assert reindex is not None
    (job,) = store.add_reindex_jobs(reindex.reindex_id, 10)
    error = JobError(stage="embed", code="boom", message="no", retryable=True)
    store.apply(
        JobEvent(job_id=job.job_id, document_id="d1", stage="embed", kind="failed", error=error)
    )
    shown = client.get(f"/v1/jobs/{job.job_id}", headers=ROOT).json()
    assert (shown["reindex_id"], shown["generation"]) == (reindex.reindex_id, 1)
    answer = client.post(f"/v1/jobs/{job.job_id}/retry", headers=ROOT)
    assert code(answer) == (409, "reindex_job")
