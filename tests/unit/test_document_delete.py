"""`DELETE /v1/documents/{id}` on the real job store, index and blob store (no broker): a
delete wins and is idempotent, and a key still cannot probe another collection's ids."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from contracts.events import JobEvent
from contracts.messages import Chunk, EmbeddedBatch, PackedVectors
from gateway.http import errors
from gateway.http.routes import documents, jobs
from gateway.http.services import JobChanges, parse_api_keys
from gateway.store.base import NewJob
from gateway.store.job_store import SqliteJobStore
from stages.backends.blobs import LocalBlobStore
from stages.backends.lance_index import LanceIndex

DOC = "d" * 32
JOB = "a" * 32
RED = {"Authorization": "Bearer alpha"}
GREEN = {"Authorization": "Bearer beta"}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, SimpleNamespace]]:
    """The document and job routes over real stores; key alpha opens `red`, beta `green`."""
    services = SimpleNamespace(
        api_keys=parse_api_keys("alpha:red,beta:green"),
        store=SqliteJobStore(tmp_path / "jobs.sqlite3"),
        index=LanceIndex(tmp_path / "index"),
        blobs=LocalBlobStore(tmp_path / "blobs"),
        changes=JobChanges(),
        admissions=asyncio.Event(),
    )
    app = FastAPI()
    errors.install(app)
    app.include_router(documents.router)
    app.include_router(jobs.router)
    app.state.services = services
    with TestClient(app) as client:
        yield client, services
    services.store.close()


def in_flight_document(services: SimpleNamespace) -> str:
    """A document of `red` half way through the pipeline: parsed, one batch of two indexed;
    returns its upload's blob."""
    sha: str = services.blobs.put_bytes(b"# Red\n\nA red document.")
    job = NewJob(JOB, DOC, "red", "red.md", "text/markdown", 22, sha)
    assert services.store.create(job) is None
    services.store.apply(JobEvent(job_id=JOB, document_id=DOC, stage="parse", kind="started"))
    services.index.upsert("red", [late_batch(0)])
    return sha


def late_batch(index: int) -> EmbeddedBatch:
    """Batch `index` of the document's two."""
    chunk = Chunk(chunk_id=f"c{index}", chunk_index=index, text="red")
    return EmbeddedBatch(
        job_id=JOB,
        document_id=DOC,
        collection="red",
        filename="red.md",
        batch_index=index,
        batch_count=2,
        chunks_total=2,
        chunks=[chunk],
        vectors=PackedVectors.pack([[1.0, 0.0, 0.0, 0.0]]),
    )


def error_code(answer: object) -> tuple[int, str]:
    """An error answer's status and code (the API's error shape)."""
    status: int = answer.status_code  # type: ignore[attr-defined]
    code: str = answer.json()["error"]["code"]  # type: ignore[attr-defined]
    return status, code


def test_a_delete_wins_and_deleting_again_answers_the_same(
    gateway: tuple[TestClient, SimpleNamespace],
) -> None:
    client, services = gateway
    sha = in_flight_document(services)
    # Another collection's key: like a document that never was, deleted or not.
    assert error_code(client.delete(f"/v1/documents/{DOC}", headers=GREEN)) == (
        404,
        "document_not_found",
    )
    assert services.index.chunk_ids("red", DOC) == ["c0"]

    assert client.delete(f"/v1/documents/{DOC}", headers=RED).status_code == 204
    assert services.index.chunk_ids("red", DOC) == []
    assert not services.blobs.exists(sha)
    # The job stays as history, ended: it no longer looks in flight.
    job = client.get(f"/v1/jobs/{JOB}", headers=RED).json()
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "document_deleted",
        False,
    )
    # A batch that was still on its way arrives, and is dropped.
    services.index.upsert("red", [late_batch(1)])
    assert services.index.chunk_ids("red", DOC) == []

    assert client.delete(f"/v1/documents/{DOC}", headers=RED).status_code == 204
    assert error_code(client.delete(f"/v1/documents/{DOC}", headers=GREEN)) == (
        404,
        "document_not_found",
    )
    assert error_code(client.delete(f"/v1/documents/{'e' * 32}", headers=RED)) == (
        404,
        "document_not_found",
    )
    # Neither a new version nor a retry can bring it back.
    new_version = {"file": ("red.md", b"# Red\n\nAgain.")}
    assert error_code(client.put(f"/v1/documents/{DOC}", files=new_version, headers=RED)) == (
        404,
        "document_not_found",
    )
    assert error_code(client.post(f"/v1/jobs/{JOB}/retry", headers=RED)) == (
        409,
        "document_deleted",
    )
