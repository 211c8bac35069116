"""The job store folds events into status and progress; redelivered events never count twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.events import JobError, JobEvent
from gateway.store.base import NewJob
from gateway.store.job_store import SqliteJobStore


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


class Clock:
    """A settable clock for the store, so 'no event for ten minutes' takes no ten minutes."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_job_without_events_for_too_long_is_stalled(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", stalled_after_s=0.5, clock=clock)
    for n in (1, 2, 3):
        store.create(NewJob(f"j{n}", f"d{n}", "default", "a.md", "text/markdown", 1, f"{n}" * 64))
    store.apply(JobEvent(job_id="j2", document_id="d2", stage="index", kind="failed"))
    clock.now += timedelta(seconds=0.25)
    store.apply(JobEvent(job_id="j3", document_id="d3", stage="parse", kind="started"))
    assert [j.stalled for j in map(store.get, ("j1", "j2", "j3")) if j] == [False] * 3

    clock.now += timedelta(seconds=0.3)
    # j1 has been queued 0.55 s with nothing picking it up; j2 ended; j3 moved 0.3 s ago.
    job = store.get("j1")
    assert job is not None and job.stalled and job.model_dump()["stalled"] is True
    assert [j.job_id for j in store.page(None, None, 10, None, stalled=True)[0]] == ["j1"]
    assert {j.job_id for j in store.page(None, None, 10, None, stalled=False)[0]} == {"j2", "j3"}
    job = store.get("j2")
    assert job is not None and job.status == "failed" and not job.stalled

    # Any event un-stalls a job.
    store.apply(JobEvent(job_id="j1", document_id="d1", stage="parse", kind="started"))
    assert store.page(None, None, 10, None, stalled=True)[0] == []


def test_listing_can_be_limited_to_a_keys_collections(store: SqliteJobStore) -> None:
    store.create(NewJob("r1", "dr", "red", "r.md", "text/markdown", 1, "r" * 64))
    store.create(NewJob("g1", "dg", "green", "g.md", "text/markdown", 1, "g" * 64))
    listed = store.page(None, None, 10, None, collections=frozenset({"red", "blue"}))[0]
    assert [j.job_id for j in listed] == ["r1"]
    everything = store.page(None, None, 10, None, collections=None)[0]
    assert {j.job_id for j in everything} == {"j1", "r1", "g1"}
    assert store.page(None, "green", 10, None, collections=frozenset({"red"}))[0] == []
    assert store.collections_of(["r1", "g1", "nope", "r1"]) == {"r1": "red", "g1": "green"}
    assert store.collections_of([]) == {}


def test_events_folded_together_give_what_one_at_a_time_gives(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    events = [
        event("parse", "started"),
        event("parse", pages=2),
        event("chunk", chunks_total=3, batch_count=1),
        event("embed", batch_index=0, batch_count=1, chunks=3),
        event("embed", batch_index=0, batch_count=1, chunks=3),  # redelivered
        event("index", batch_index=0, batch_count=1, chunks=3),
        JobEvent(job_id="unknown", document_id="d9", stage="parse", kind="started"),
    ]
    assert store.apply_all(events) == {"j1"}
    one_by_one = SqliteJobStore(tmp_path / "other.sqlite3")
    one_by_one.create(NewJob("j1", "d1", "default", "a.pdf", "application/pdf", 10, "a" * 64))
    for e in events:
        one_by_one.apply(e)
    together, apart = store.get("j1"), one_by_one.get("j1")
    assert together is not None and apart is not None
    assert together.status == apart.status == "indexed"
    assert together.progress == apart.progress
    assert together.progress.chunks_indexed == 3
