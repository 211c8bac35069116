"""What only the SQLite store does (files written by older releases keep working), and the
tracker's fold loop riding out a job store that is briefly away.

Everything both stores must do is in test_job_store_contract.py, run against each.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from contracts.errors import Transient
from contracts.events import JobEvent
from contracts.message_signature import SIGNATURE_HEADER, MessageSigner
from contracts.routing import Lane
from gateway.http.services import JobChanges
from gateway.store import tracker as tracker_module
from gateway.store.base import (
    OPEN_KEY_OWNER,
    Admission,
    IdempotencyKeyReused,
    JobStore,
    NewJob,
)
from gateway.store.job_store import SqliteJobStore
from gateway.store.tracker import Tracker

# The tables as a release before confirmations wrote them.
_BEFORE_CONFIRMATIONS = """
CREATE TABLE documents (document_id TEXT PRIMARY KEY, collection TEXT NOT NULL,
    current_job_id TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, document_id TEXT NOT NULL,
    collection TEXT NOT NULL, filename TEXT NOT NULL, content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, blob_sha256 TEXT NOT NULL, parsed_sha256 TEXT,
    status TEXT NOT NULL, pages INTEGER, chunks_total INTEGER, error TEXT, language TEXT,
    idempotency_key TEXT UNIQUE, trace_id TEXT, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE job_stages (job_id TEXT NOT NULL, stage TEXT NOT NULL, started_at TEXT,
    finished_at TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    units_done INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, stage));
CREATE TABLE job_units (job_id TEXT NOT NULL, stage TEXT NOT NULL,
    batch_index INTEGER NOT NULL, batch_count INTEGER NOT NULL, chunks INTEGER NOT NULL,
    PRIMARY KEY (job_id, stage, batch_index));
INSERT INTO documents VALUES ('d-old', 'default', 'j-old', '2024-01-01T00:00:00+00:00');
INSERT INTO jobs (job_id, document_id, collection, filename, content_type, size_bytes,
    blob_sha256, status, idempotency_key, created_at, updated_at)
    VALUES ('j-old', 'd-old', 'default', 'old.pdf', 'application/pdf', 1, 'old-bytes',
    'queued', 'old-key', '2024-01-01T00:00:00+00:00', '2024-01-01T00:00:00+00:00');
"""


def old_file(path: Path) -> Path:
    """An SQLite job store as the release before confirmations left it, with one job."""
    with sqlite3.connect(path) as db:
        db.executescript(_BEFORE_CONFIRMATIONS)
    db.close()
    return path


def test_jobs_from_before_confirmations_count_as_confirmed(tmp_path: Path) -> None:
    store = SqliteJobStore(old_file(tmp_path / "jobs.sqlite3"))
    try:
        # It was answered 202 only once the broker had it: nobody must publish it again.
        assert store.is_confirmed("j-old")
        assert store.claim_unconfirmed(0, 30, 10) == []
        assert not store.forget("j-old")
        duplicate = store.create(
            NewJob(
                "j-new", "d-new", "default", "n.pdf", "application/pdf", 1, "old-bytes", "old-key"
            )
        )
        assert duplicate is not None and duplicate.job_id == "j-old"
        new = NewJob("j-new", "d-new", "default", "n.pdf", "application/pdf", 1, "new-bytes")
        assert store.create(new) is None and not store.is_confirmed("j-new")
    finally:
        store.close()


def test_jobs_from_before_lanes_were_admitted_when_recorded(tmp_path: Path) -> None:
    store = SqliteJobStore(old_file(tmp_path / "jobs.sqlite3"), queue_max_age_s=0)
    try:
        job = store.get("j-old")
        assert job is not None and store.is_admitted("j-old")
        assert (job.priority, job.admitted_at, job.webhook) == ("interactive", job.created_at, None)
        # In line for the first stage, nobody ahead; held by no admitter.
        assert job.queue.position == 0 and store.claim_admissions(30, 10) == []
    finally:
        store.close()


def test_a_page_of_jobs_is_placed_from_one_snapshot_kept_a_second(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", admission=Admission(bulk_in_flight=4))
    statements: list[str] = []
    try:
        for n in range(120):
            priority: Lane = "bulk" if n % 2 else "interactive"
            job = NewJob(f"j{n}", f"d{n}", f"c{n % 5}", "a.pdf", "application/pdf", 1, f"s{n}")
            assert store.create(replace(job, priority=priority)) is None
        store._db.set_trace_callback(statements.append)
        jobs, _ = store.page(None, None, 50, None)
        assert len(jobs) == 50 and all(j.queue.position is not None for j in jobs)
        # One read of the waiting jobs and one count of those that ended, not 50 of each.
        assert sum("LEFT JOIN documents" in s for s in statements) == 1, statements
        assert sum("COUNT(" in s.upper() for s in statements) == 1, statements
        statements.clear()
        store.page(None, None, 50, None)  # within the second: the same snapshot
        assert not any("LEFT JOIN documents" in s for s in statements), statements
    finally:
        store.close()


def test_two_processes_upgrading_one_old_file_at_once_both_start(tmp_path: Path) -> None:
    path = old_file(tmp_path / "jobs.sqlite3")
    barrier = threading.Barrier(4)
    opened: list[SqliteJobStore] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            opened.append(SqliteJobStore(path))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures and len(opened) == 4
    assert all(store.is_confirmed("j-old") for store in opened)
    for store in opened:
        store.close()


def test_keys_from_before_owners_answer_in_their_collection_and_free_a_deleted_ones(
    tmp_path: Path,
) -> None:
    path = old_file(tmp_path / "jobs.sqlite3")
    with sqlite3.connect(path) as db:
        # A job whose document was deleted: its key was never freed then.
        db.execute(
            "INSERT INTO jobs (job_id, document_id, collection, filename, content_type,"
            " size_bytes, blob_sha256, status, idempotency_key, created_at, updated_at)"
            " VALUES ('j-gone', 'd-gone', 'default', 'g.pdf', 'application/pdf', 1, 'gone-bytes',"
            " 'indexed', 'gone-key', '2024-01-01T00:00:00+00:00', '2024-01-01T00:00:00+00:00')"
        )
    db.close()
    store = SqliteJobStore(path)

    def upload(job_id: str, sha: str, key: str, owner: str, collection: str = "default") -> Any:
        job = NewJob(job_id, f"d-{job_id}", collection, "n.txt", "text/plain", 1, sha, key)
        return store.create(replace(job, key_owner=owner))

    try:
        # Its owner was not recorded: in its collection it answers whoever may use it.
        for owner in (OPEN_KEY_OWNER, "fingerprint-of-a-key"):
            duplicate = upload("j-1", "old-bytes", "old-key", owner)
            assert duplicate is not None and duplicate.job_id == "j-old"
            with pytest.raises(IdempotencyKeyReused):
                upload("j-2", "other-bytes", "old-key", owner)
        # The key is no longer unique in the whole table: elsewhere two owners use it.
        assert upload("j-3", "x", "old-key", "alice", "other") is None
        assert upload("j-4", "y", "old-key", "bob", "other") is None
        # A deleted document's key is free.
        assert upload("j-5", "new-bytes", "gone-key", OPEN_KEY_OWNER) is None
        assert store.get("j-gone") is not None  # the job stays, as history
    finally:
        store.close()


class Delivery:
    """A tracker delivery double: its body, signed as a stage sends it, and whether it was
    acked."""

    def __init__(self, event: JobEvent, signer: MessageSigner) -> None:
        self.body = event.model_dump_json().encode()
        self.routing_key = event.routing_key
        self.headers = {SIGNATURE_HEADER: signer.sign(event.routing_key, self.body)}
        self.acked = asyncio.Event()

    async def ack(self) -> None:
        """The tracker settled it."""
        self.acked.set()


class FlakyStore:
    """A job store that is away for its first `away` folds."""

    def __init__(self, inner: JobStore, away: int) -> None:
        self.inner = inner
        self.away = away
        self.folds = 0

    def apply_all(self, events: list[JobEvent]) -> set[str]:
        """Fold, unless still away."""
        self.folds += 1
        if self.folds <= self.away:
            raise Transient("the job store is restarting", code="job_store_unavailable")
        return self.inner.apply_all(events)


async def test_the_tracker_folds_again_once_the_store_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", (0.01,))
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    assert store.create(NewJob("j1", "d1", "default", "a.pdf", "application/pdf", 1, "a")) is None
    flaky = FlakyStore(store, away=2)
    changes = JobChanges()
    signer = MessageSigner("test-secret")
    tracker = Tracker(cast(Any, SimpleNamespace(signer=signer)), cast(JobStore, flaky), changes)
    folder = asyncio.create_task(tracker._fold_forever())
    try:
        started = JobEvent(job_id="j1", document_id="d1", stage="parse", kind="started")
        delivery = Delivery(started, signer)
        await tracker._on_event(cast(Any, delivery))
        async with asyncio.timeout(10):
            await delivery.acked.wait()
        assert flaky.folds == 3
        job = store.get("j1")
        assert job is not None and job.status == "parsing"
    finally:
        folder.cancel()
        store.close()
