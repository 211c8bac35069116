"""The job store folds events into status and progress; redelivered events never count twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.events import JobError, JobEvent
from gateway.jobs import NewJob, SqliteJobStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(NewJob("j1", "d1", "default", "a.pdf", "application/pdf", 10, "a" * 64))
    return store


def event(stage: str, kind: str = "progress", **fields: object) -> JobEvent:
    return JobEvent.model_validate(
        {"job_id": "j1", "document_id": "d1", "stage": stage, "kind": kind, **fields}
    )


def test_a_job_moves_forward_and_counts_each_batch_once(store: SqliteJobStore) -> None:
    def status() -> str:
        job = store.get("j1")
        assert job is not None
        return job.status

    store.apply(event("parse", "started"))
    assert status() == "parsing"
    store.apply(event("parse", pages=3, parsed_sha256="b" * 64))
    assert status() == "chunking"  # parsed: waiting for (or in) the chunk stage
    store.apply(event("chunk", chunks_total=5, batch_count=1))
    assert status() == "embedding"
    store.apply(event("embed", batch_index=0, batch_count=2, chunks=2))
    assert status() == "embedding"
    for index_ in (1, 1, 0):  # redelivered batches
        store.apply(event("embed", batch_index=index_, batch_count=2, chunks=index_ + 2))
    job = store.get("j1")
    assert job is not None
    assert job.status == "indexing"
    assert (job.progress.pages, job.progress.chunks_total) == (3, 5)
    assert job.progress.chunks_embedded == 5
    assert job.stages["embed"].finished_at is not None

    store.apply(event("index", batch_index=1, batch_count=2, chunks=3))
    # A late event from an earlier stage never moves the status back.
    store.apply(event("chunk", "started"))
    assert status() == "indexing"
    store.apply(event("index", batch_index=0, batch_count=2, chunks=2))
    job = store.get("j1")
    assert job is not None and job.status == "indexed"
    assert job.progress.chunks_indexed == 5


def test_failure_is_terminal_until_reopened(store: SqliteJobStore) -> None:
    error = JobError(stage="embed", code="model_down", message="no model", retryable=True)
    store.apply(event("embed", "failed", error=error, attempt=3))
    store.apply(event("embed", batch_index=1, batch_count=2, chunks=1))
    job = store.get("j1")
    assert job is not None and job.status == "failed" and job.error == error
    assert job.stages["embed"].attempts == 3
    reopened = store.reopen("j1")
    assert reopened is not None and reopened.status == "embedding" and reopened.error is None
    assert store.reopen("j1") is None


def test_pages_of_jobs_follow_the_cursor(store: SqliteJobStore) -> None:
    for n in range(2, 6):
        store.create(NewJob(f"j{n}", f"d{n}", "other", "x.txt", "text/plain", 1, f"{n}" * 64))
    seen: list[str] = []
    cursor = None
    while True:
        jobs, cursor = store.page(None, "other", 3, cursor)
        seen += [j.job_id for j in jobs]
        if cursor is None:
            break
    assert sorted(seen) == ["j2", "j3", "j4", "j5"] and len(seen) == 4
    with pytest.raises(ValueError):
        store.page(None, None, 3, "not-a-cursor")
