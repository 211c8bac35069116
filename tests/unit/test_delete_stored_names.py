"""A blob name the job store kept from before events were checked (`parsed_sha256` of
`../../x`) never breaks `DELETE /v1/documents/{id}`: it is skipped, the real blobs go, and
the delete answers 204 with the document gone, rather than a 500 half way through."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.http import errors
from gateway.http.routes import documents
from gateway.http.services import JobChanges, parse_api_keys
from gateway.store.base import NewJob
from gateway.store.job_store import SqliteJobStore
from stages.backends.blobs import LocalBlobStore
from stages.backends.lance_index import LanceIndex

DOC = "d" * 32
JOB = "a" * 32
KEY = {"Authorization": "Bearer ops"}


def test_a_stored_blob_name_that_is_no_sha256_is_skipped_and_the_delete_completes(
    tmp_path: Path,
) -> None:
    services = SimpleNamespace(
        api_keys=parse_api_keys("ops"),
        store=SqliteJobStore(tmp_path / "jobs.sqlite3"),
        index=LanceIndex(tmp_path / "index"),
        blobs=LocalBlobStore(tmp_path / "blobs"),
        changes=JobChanges(),
        admissions=asyncio.Event(),
    )
    app = FastAPI()
    errors.install(app)
    app.include_router(documents.router)
    app.state.services = services
    try:
        sha = services.blobs.put_bytes(b"# Notes\n\nSome notes.")
        job = NewJob(JOB, DOC, "default", "notes.md", "text/markdown", 20, sha)
        assert services.store.create(job) is None
        # As an unchecked job event once recorded it.
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
            db.execute("UPDATE jobs SET parsed_sha256 = '../../x' WHERE job_id = ?", (JOB,))
        db.close()
        (tmp_path / "x").write_text("outside the blob store")

        with TestClient(app, raise_server_exceptions=False) as client:
            answer = client.delete(f"/v1/documents/{DOC}", headers=KEY)
            assert answer.status_code == 204, answer.text
            assert services.store.document_collection(DOC) is None
            assert not services.blobs.exists(sha)
            assert (tmp_path / "x").read_text() == "outside the blob store"
    finally:
        services.store.close()
