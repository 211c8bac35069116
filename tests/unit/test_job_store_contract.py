"""One body of tests for every `JobStore`: SQLite and PostgreSQL must both pass each of them
(the same tests, real implementations).

Where a test needs "another gateway", it opens a second store on the same database: for
PostgreSQL that is a second connection pool, so concurrent calls really race in the server.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from postgres import PostgresHandle

from contracts.errors import Transient
from contracts.events import JobError, JobEvent
from contracts.routing import Lane
from contracts.settings import Settings
from gateway.store.base import (
    OPEN_KEY_OWNER,
    Admission,
    DocumentGone,
    IdempotencyKeyReused,
    JobStore,
    NewJob,
)
from gateway.store.changes import (
    APPLICATION_NAME,
    InProcessChangeFeed,
    PgChangeFeed,
    open_change_feed,
)
from gateway.store.job_store import SqliteJobStore
from gateway.store.pg_job_db import COMPONENT, MIGRATIONS
from gateway.store.pg_job_store import PgJobStore
from stages.backends.pg_schema import migrate

T = TypeVar("T")
# Whatever a test waits on, it waits at most this long (never a bare sleep).
DEADLINE_S = 10.0


class Clock:
    """A settable clock for the store, so 'ten minutes later' takes no ten minutes."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time on."""
        self.now += timedelta(seconds=seconds)


@dataclass
class Backend:
    """One database of one kind; `open` gives another store on it (another gateway)."""

    kind: str
    where: str
    opened: list[SqliteJobStore | PgJobStore] = field(default_factory=list)

    def open(self, **options: Any) -> JobStore:
        """A store on this backend's database."""
        store: SqliteJobStore | PgJobStore
        if self.kind == "sqlite":
            store = SqliteJobStore(Path(self.where), **options)
        else:
            store = PgJobStore(self.where, **options)
        self.opened.append(store)
        return store

    def close(self) -> None:
        """Close every store opened."""
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each implementation in turn, on a new, empty database."""
    if request.param == "sqlite":
        opened = Backend("sqlite", str(tmp_path / "jobs.sqlite3"))
    else:
        postgres: PostgresHandle = request.getfixturevalue("postgres")
        opened = Backend("postgres", postgres.database("jobs"))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def store(backend: Backend) -> JobStore:
    """A store with one job, j1 (document d1, collection default)."""
    store = backend.open()
    assert store.create(new_job("j1", "d1")) is None
    return store


def new_job(
    job_id: str,
    document_id: str,
    collection: str = "default",
    sha: str | None = None,
    key: str | None = None,
    *,
    replaces: bool = False,
    priority: Lane = "interactive",
    callback_url: str | None = None,
    owner: str = OPEN_KEY_OWNER,
) -> NewJob:
    """A job about to be queued; its bytes are its own unless `sha` says otherwise; `owner`
    is whose `key` it is."""
    return NewJob(
        job_id=job_id,
        document_id=document_id,
        collection=collection,
        filename=f"{document_id}.pdf",
        content_type="application/pdf",
        size_bytes=10,
        blob_sha256=sha or f"sha-of-{job_id}",
        idempotency_key=key,
        replaces=replaces,
        priority=priority,
        callback_url=callback_url,
        key_owner=owner,
    )


def event(stage: str, kind: str = "progress", job: str = "j1", **fields: object) -> JobEvent:
    """An event of job `job` (document d1 unless `document_id` is given)."""
    values: dict[str, object] = {"document_id": "d1", **fields}
    return JobEvent.model_validate({"job_id": job, "stage": stage, "kind": kind, **values})


def get(store: JobStore, job_id: str) -> Any:
    """A job that must exist."""
    job = store.get(job_id)
    assert job is not None, f"no job {job_id}"
    return job


def all_jobs(store: JobStore) -> list[str]:
    """Every job id, newest first."""
    return [j.job_id for j in store.page(None, None, 500, None)[0]]


def at_once(n: int, work: Callable[[int], T]) -> list[T]:
    """Run `work(0..n-1)` in n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 3)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a thread is stuck"
    return results  # type: ignore[return-value]


# --- folding events --------------------------------------------------------------------------


def test_a_job_moves_forward_and_counts_each_batch_once(store: JobStore) -> None:
    store.apply(event("parse", "started"))
    assert get(store, "j1").status == "parsing"
    store.apply(event("parse", pages=3, parsed_sha256="b" * 64))
    assert get(store, "j1").status == "chunking"  # parsed: waiting for (or in) chunk
    store.apply(event("chunk", chunks_total=5, batch_count=1))
    assert get(store, "j1").status == "embedding"
    store.apply(event("embed", batch_index=0, batch_count=2, chunks=2))
    assert get(store, "j1").status == "embedding"
    for index_ in (1, 1, 0):  # redelivered batches
        store.apply(event("embed", batch_index=index_, batch_count=2, chunks=index_ + 2))
    job = get(store, "j1")
    assert job.status == "indexing"
    assert (job.progress.pages, job.progress.chunks_total) == (3, 5)
    assert job.progress.chunks_embedded == 5
    assert job.stages["embed"].finished_at is not None
    assert list(job.stages) == ["parse", "chunk", "embed"]  # pipeline order

    store.apply(event("index", batch_index=1, batch_count=2, chunks=3))
    # A late event from an earlier stage never moves the status back.
    store.apply(event("chunk", "started"))
    assert get(store, "j1").status == "indexing"
    store.apply(event("index", batch_index=0, batch_count=2, chunks=2))
    job = get(store, "j1")
    assert job.status == "indexed" and job.progress.chunks_indexed == 5


def test_failure_is_terminal_until_reopened(store: JobStore) -> None:
    error = JobError(stage="embed", code="model_down", message="no model", retryable=True)
    store.apply(event("embed", "failed", error=error, attempt=3))
    store.apply(event("embed", batch_index=1, batch_count=2, chunks=1))
    job = get(store, "j1")
    assert job.status == "failed" and job.error == error
    assert job.stages["embed"].attempts == 3
    reopened = store.reopen("j1")
    assert reopened is not None and reopened.status == "embedding" and reopened.error is None
    assert store.reopen("j1") is None
    assert store.reopen("nope") is None


def test_events_folded_together_give_what_one_at_a_time_gives(store: JobStore) -> None:
    assert store.create(new_job("k1", "dk")) is None

    def events(job: str) -> list[JobEvent]:
        return [
            event("parse", "started", job),
            event("parse", job=job, pages=2),
            event("chunk", job=job, chunks_total=3, batch_count=1),
            event("embed", job=job, batch_index=0, batch_count=1, chunks=3),
            event("embed", job=job, batch_index=0, batch_count=1, chunks=3),  # redelivered
            event("index", job=job, batch_index=0, batch_count=1, chunks=3),
        ]

    unknown = JobEvent(job_id="unknown", document_id="d9", stage="parse", kind="started")
    assert store.apply_all([*events("j1"), unknown]) == {"j1"}
    assert store.apply_all([]) == set()
    for e in events("k1"):
        store.apply(e)
    together, apart = get(store, "j1"), get(store, "k1")
    assert together.status == apart.status == "indexed"
    assert together.progress == apart.progress
    assert together.progress.chunks_indexed == 3


def test_concurrent_folds_of_the_same_events_count_each_unit_once(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]  # two gateways' trackers on one database
    jobs = [f"j{n}" for n in range(4)]
    batches = 8
    for n, job_id in enumerate(jobs):
        assert stores[0].create(new_job(job_id, f"d{n}")) is None
    events = [
        e
        for job_id in jobs
        for e in (
            event("parse", "started", job_id),
            event("parse", job=job_id, pages=4),
            event("chunk", job=job_id, chunks_total=batches * 3, batch_count=batches),
            *(
                event(stage, job=job_id, batch_index=b, batch_count=batches, chunks=3)
                for stage in ("embed", "index")
                for b in range(batches)
            ),
        )
    ]

    def fold(i: int) -> None:
        # Each tracker gets every event (redeliveries), in its own order and batch sizes,
        # so its transactions lock the jobs in orders of their own.
        mine = random.Random(i).sample(events, len(events))
        size = 1 + i % 5
        for start in range(0, len(mine), size):
            stores[i % 2].apply_all(mine[start : start + size])

    at_once(6, fold)
    for job_id in jobs:
        job = get(stores[1], job_id)
        assert job.status == "indexed", job
        assert job.progress.chunks_embedded == job.progress.chunks_indexed == batches * 3


# --- listing ---------------------------------------------------------------------------------


def test_pages_of_jobs_follow_the_cursor(store: JobStore) -> None:
    for n in range(2, 6):
        assert store.create(new_job(f"j{n}", f"d{n}", "other")) is None
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


def test_collections_count_their_documents_and_indexed_chunks(store: JobStore) -> None:
    assert store.create(new_job("r1", "dr1", "red")) is None
    assert store.create(new_job("r2", "dr2", "red")) is None
    store.apply(event("index", job="r1", document_id="dr1", chunks=3))

    found = [(c.collection, c.documents, c.chunks) for c in store.collections()]

    # j1 (the fixture's) waits in `default`; of red's two documents one is indexed.
    assert found == [("default", 1, 0), ("red", 2, 3)]


def test_listing_can_be_limited_to_a_keys_collections(store: JobStore) -> None:
    assert store.create(new_job("r1", "dr", "red")) is None
    assert store.create(new_job("g1", "dg", "green")) is None
    listed = store.page(None, None, 10, None, collections=frozenset({"red", "blue"}))[0]
    assert [j.job_id for j in listed] == ["r1"]
    everything = store.page(None, None, 10, None, collections=None)[0]
    assert {j.job_id for j in everything} == {"j1", "r1", "g1"}
    assert store.page(None, "green", 10, None, collections=frozenset({"red"}))[0] == []
    assert store.collections_of(["r1", "g1", "nope", "r1"]) == {"r1": "red", "g1": "green"}
    assert store.collections_of([]) == {}
    assert store.count_by_status() == {"queued": 3}


def test_a_job_without_events_for_too_long_is_stalled(backend: Backend) -> None:
    clock = Clock()
    store = backend.open(stalled_after_s=0.5, clock=clock)
    for n in (1, 2, 3):
        assert store.create(new_job(f"j{n}", f"d{n}")) is None
    store.apply(event("index", "failed", "j2", document_id="d2"))
    clock.advance(0.25)
    store.apply(event("parse", "started", "j3", document_id="d3"))
    assert [get(store, j).stalled for j in ("j1", "j2", "j3")] == [False] * 3

    clock.advance(0.3)
    # j1 has been queued 0.55 s with nothing picking it up; j2 ended; j3 moved 0.3 s ago.
    job = get(store, "j1")
    assert job.stalled and job.model_dump()["stalled"] is True
    # Queued and never picked up: it is stuck waiting for the first stage.
    assert job.stalled_in == "parse"
    assert [j.job_id for j in store.page(None, None, 10, None, stalled=True)[0]] == ["j1"]
    assert {j.job_id for j in store.page(None, None, 10, None, stalled=False)[0]} == {"j2", "j3"}
    job = get(store, "j2")
    assert job.status == "failed" and not job.stalled

    # Any event un-stalls a job.
    store.apply(event("parse", "started", "j1"))
    assert store.page(None, None, 10, None, stalled=True)[0] == []
    assert get(store, "j1").stalled_in is None
    # Stuck again, now in parse's hands: the report names the stage it is in.
    clock.advance(0.6)
    assert get(store, "j1").status == "parsing"
    assert get(store, "j1").stalled_in == "parse"


def test_documents_their_current_job_and_their_blobs(store: JobStore) -> None:
    assert store.document_collection("d1") == "default"
    assert get(store, "j1").document_id == "d1"
    assert store.create(new_job("j2", "d1", replaces=True)) is None
    current = store.current_job("d1")
    assert current is not None and current.job_id == "j2"
    parsed = "5" * 64  # events name blobs by sha256 only
    store.apply(event("parse", parsed_sha256=parsed))
    assert store.blob_in_use("sha-of-j1") and store.blob_in_use(parsed)
    blobs = store.delete_document("d1")
    assert {(b.blob_sha256, b.parsed_sha256) for b in blobs} == {
        ("sha-of-j1", parsed),
        ("sha-of-j2", None),
    }
    assert store.document_collection("d1") is None and store.current_job("d1") is None
    assert not store.blob_in_use("sha-of-j1") and not store.blob_in_use(parsed)
    assert get(store, "j1").job_id == "j1"  # jobs stay, as history
    store.ping()


# --- accepting uploads: duplicates, confirmation, recovery ------------------------------------


def test_create_returns_a_duplicate_and_writes_nothing(backend: Backend) -> None:
    store = backend.open()
    assert store.create(new_job("a", "da", sha="X", key="key-1")) is None
    before = all_jobs(store)

    # The same Idempotency-Key with the same bytes: that job.
    same_key = store.create(new_job("b", "db", sha="X", key="key-1"))
    assert same_key is not None and same_key.job_id == "a"
    # The same bytes in a live document of the collection.
    same_bytes = store.create(new_job("c", "dc", sha="X"))
    assert same_bytes is not None and same_bytes.job_id == "a" and same_bytes.status == "queued"
    assert store.find_duplicate("default", "X", None) == same_bytes
    # A new version with the bytes its document has now.
    same_version = store.create(new_job("d", "da", sha="X", replaces=True))
    assert same_version is not None and same_version.job_id == "a"
    assert all_jobs(store) == before
    assert [store.get(job_id) for job_id in ("b", "c", "d")] == [None] * 3
    assert store.document_collection("db") is None and store.document_collection("dc") is None
    current = store.current_job("da")
    assert current is not None and current.job_id == "a"

    # Not duplicates: other bytes, another collection, or a new version with bytes that only
    # another document of the collection has.
    assert store.create(new_job("e", "de", sha="Z")) is None
    assert store.create(new_job("f", "df", "other", sha="X")) is None
    assert store.create(new_job("g", "da", sha="Z", replaces=True)) is None
    current = store.current_job("da")
    assert current is not None and current.job_id == "g"
    assert store.find_duplicate("elsewhere", "X", None) is None


def test_a_failed_or_deleted_document_is_no_duplicate(backend: Backend) -> None:
    store = backend.open()
    assert store.create(new_job("a", "da", sha="X")) is None
    error = JobError(stage="parse", code="bad_pdf", message="broken", retryable=False)
    store.apply(event("parse", "failed", "a", document_id="da", error=error))
    assert store.create(new_job("b", "db", sha="X")) is None  # uploading again is a retry
    store.delete_document("db")
    assert store.create(new_job("c", "dc", sha="X")) is None
    # A failed current version is no duplicate of a new version with its bytes either.
    store.apply(event("parse", "failed", "c", document_id="dc", error=error))
    assert store.create(new_job("d", "dc", sha="X", replaces=True)) is None


@pytest.mark.parametrize("same", ["key", "bytes"])
def test_of_concurrent_uploads_of_one_thing_exactly_one_creates(
    backend: Backend, same: str
) -> None:
    stores = [backend.open(), backend.open(), backend.open()]

    def upload(i: int) -> str | None:
        if same == "key":  # a client retrying: same key, same bytes
            job = new_job(f"j{i}", f"d{i}", sha="the-same-bytes", key="one-key")
        else:
            job = new_job(f"j{i}", f"d{i}", sha="the-same-bytes")
        duplicate = stores[i % len(stores)].create(job)
        return None if duplicate is None else duplicate.job_id

    answers = at_once(30, upload)
    created = [i for i, answer in enumerate(answers) if answer is None]
    assert len(created) == 1, answers
    winner = f"j{created[0]}"
    assert all(answer == winner for answer in answers if answer is not None), answers
    assert all_jobs(stores[0]) == [winner]
    assert stores[0].document_collection(f"d{created[0]}") == "default"


def test_an_idempotency_key_is_its_owners_in_one_collection(backend: Backend) -> None:
    store = backend.open()
    assert store.create(new_job("a", "da", sha="X", key="k", owner="alice")) is None
    # A new version, so the same bytes alone are no duplicate: only the key answers below.
    assert store.create(new_job("a1", "da", sha="V", replaces=True)) is None

    again = store.create(new_job("a2", "da2", sha="X", key="k", owner="alice"))
    assert again is not None and again.job_id == "a"
    found = store.find_duplicate("default", "X", "k", key_owner="alice")
    assert found is not None and found.job_id == "a"
    # Other bytes with that key: refused, nothing written, the first job named.
    with pytest.raises(IdempotencyKeyReused) as reused:
        store.create(new_job("a3", "da3", sha="Y", key="k", owner="alice"))
    assert (reused.value.code, reused.value.first_job_id) == ("idempotency_key_reused", "a")
    assert "'k'" in reused.value.message and "other content" in reused.value.message
    with pytest.raises(IdempotencyKeyReused):
        store.find_duplicate("default", "Y", "k", key_owner="alice")
    assert store.get("a3") is None and store.document_collection("da3") is None

    # Another owner's key of the same name is a key of its own: its upload is new work,
    # never answered with alice's job, and its key answers it from then on.
    assert store.find_duplicate("default", "Y", "k", key_owner="bob") is None
    assert store.create(new_job("b", "db", sha="Y", key="k", owner="bob")) is None
    bobs = store.create(new_job("b2", "db2", sha="Y", key="k", owner="bob"))
    assert bobs is not None and bobs.job_id == "b"
    # So is alice's key in another collection.
    assert store.create(new_job("c", "dc", "other", sha="Y", key="k", owner="alice")) is None
    assert {get(store, j).document_id for j in ("a", "b", "c")} == {"da", "db", "dc"}
    # An empty key is no key: it never makes one upload the duplicate of another.
    assert store.create(new_job("e1", "de1", sha="E1", key="")) is None
    assert store.create(new_job("e2", "de2", sha="E2", key="")) is None


def test_a_deleted_documents_keys_are_free_again(backend: Backend) -> None:
    store = backend.open()
    assert store.create(new_job("a", "da", sha="X", key="k")) is None
    store.delete_document("da")
    # The key starts afresh: new work, with other bytes or with the same.
    assert store.find_duplicate("default", "Y", "k") is None
    assert store.create(new_job("b", "db", sha="Y", key="k")) is None
    store.delete_document("db")
    assert store.create(new_job("c", "dc", sha="X", key="k")) is None
    assert get(store, "a").document_id == "da"  # the jobs stay, as history
    # A job withdrawn (its publish refused) frees its key too.
    assert store.create(new_job("d", "dd", sha="Z", key="k2")) is None
    assert store.forget("d")
    assert store.create(new_job("e", "de", sha="W", key="k2")) is None


def test_of_concurrent_uploads_with_one_key_one_creates_for_each_owner(backend: Backend) -> None:
    stores = [backend.open(), backend.open(), backend.open()]
    owners = ("alice", "bob")

    def upload(i: int) -> str:
        # Every upload has bytes of its own: of each owner's, one is the key's first.
        owner = owners[i % len(owners)]
        job = new_job(f"j{i}", f"d{i}", sha=f"bytes-{i}", key="one-key", owner=owner)
        try:
            duplicate = stores[i % len(stores)].create(job)
        except IdempotencyKeyReused as exc:
            return f"reused:{exc.first_job_id}"
        assert duplicate is None, duplicate  # never another's job: the bytes differ
        return "created"

    answers = at_once(30, upload)
    for n in range(len(owners)):
        mine = answers[n :: len(owners)]
        assert mine.count("created") == 1, answers
        winner = f"j{n + mine.index('created') * len(owners)}"
        assert all(a == f"reused:{winner}" for a in mine if a != "created"), answers
    assert len(all_jobs(stores[0])) == len(owners)


def test_a_job_is_confirmed_by_its_confirm_or_by_any_event(store: JobStore) -> None:
    assert not store.is_confirmed("j1")
    store.confirm("j1")
    store.confirm("j1")  # twice is once
    assert store.is_confirmed("j1")
    assert not store.is_confirmed("nope")
    store.confirm("nope")  # an unknown job: nothing to do
    assert store.create(new_job("j2", "d2")) is None
    # A stage's event proves the broker had the job, even if no confirm was recorded.
    store.apply(event("parse", "started", "j2", document_id="d2"))
    assert store.is_confirmed("j2")


def test_claims_take_old_unconfirmed_jobs_one_lease_at_a_time(backend: Backend) -> None:
    clock = Clock()
    gateway_a, gateway_b = backend.open(clock=clock), backend.open(clock=clock)
    for n in range(1, 5):
        assert gateway_a.create(new_job(f"j{n}", f"d{n}")) is None
    gateway_a.confirm("j2")
    gateway_a.delete_document("d3")  # deleted before anyone published it: leave it
    assert gateway_a.claim_unconfirmed(60, 30, 10) == []  # too young yet
    clock.advance(61)
    assert gateway_a.create(new_job("j5", "d5")) is None  # young

    claimed = gateway_a.claim_unconfirmed(60, 30, 10)
    assert [j.job_id for j in claimed] == ["j1", "j4"]
    assert gateway_b.claim_unconfirmed(60, 30, 10) == []  # leased to gateway a
    clock.advance(29)
    assert gateway_b.claim_unconfirmed(60, 30, 10) == []
    gateway_a.confirm("j1")  # published again and confirmed
    clock.advance(2)
    # The lease on j4 ran out (its claimer died?): the next caller gets it.
    assert [j.job_id for j in gateway_b.claim_unconfirmed(60, 30, 10)] == ["j4"]
    clock.advance(31)  # j4's lease ran out again, and j5 is old now: oldest first
    assert [j.job_id for j in gateway_a.claim_unconfirmed(60, 30, 1)] == ["j4"]
    assert [j.job_id for j in gateway_a.claim_unconfirmed(60, 30, 1)] == ["j5"]
    assert gateway_b.claim_unconfirmed(60, 30, 10) == []


def test_concurrent_claims_never_share_a_job(backend: Backend) -> None:
    clock = Clock()
    stores = [backend.open(clock=clock) for _ in range(3)]
    for n in range(40):
        # Four collections: none past its cap of interactive jobs in flight, so none held.
        assert stores[0].create(new_job(f"j{n}", f"d{n}", f"c{n % 4}")) is None
    clock.advance(120)
    claims = at_once(12, lambda i: [j.job_id for j in stores[i % 3].claim_unconfirmed(60, 30, 5)])
    taken = [job_id for claim in claims for job_id in claim]
    assert sorted(taken) == sorted(f"j{n}" for n in range(40))


def test_forget_removes_only_an_unconfirmed_unclaimed_job(backend: Backend) -> None:
    clock = Clock()
    store = backend.open(clock=clock)
    assert store.create(new_job("v1", "d1", sha="one")) is None
    store.confirm("v1")
    clock.advance(1)
    assert store.create(new_job("v2", "d1", sha="two", replaces=True)) is None
    assert store.forget("v2")  # the broker refused the new version
    current = store.current_job("d1")
    assert current is not None and current.job_id == "v1"  # the old version is current again
    assert store.get("v2") is None
    assert not store.forget("v2") and not store.forget("nope")
    assert not store.forget("v1")  # confirmed: in the pipeline

    assert store.create(new_job("n1", "dn")) is None
    assert store.forget("n1")
    assert store.document_collection("dn") is None  # its only job: the document goes too
    assert store.create(new_job("n1", "dn")) is None  # and the same upload may come again

    assert store.create(new_job("c1", "dc")) is None
    clock.advance(120)
    assert [j.job_id for j in store.claim_unconfirmed(60, 30, 10)] == ["n1", "c1"]
    assert not store.forget("c1")  # claimed: another gateway may be publishing it
    assert get(store, "c1").status == "queued"


# --- several gateways ------------------------------------------------------------------------


def test_two_stores_opening_a_new_database_at_once_make_one_schema(backend: Backend) -> None:
    stores = at_once(4, lambda _: backend.open())
    assert stores[0].create(new_job("j1", "d1")) is None
    assert [get(s, "j1").job_id for s in stores] == ["j1"] * 4


class Heard:
    """A change sink that records what its feed passed on."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.everything = 0
        self._changed = asyncio.Event()

    def notify(self, job_id: str) -> None:
        """A job changed."""
        self.jobs.append(job_id)
        self._changed.set()

    def notify_all(self) -> None:
        """The feed (re)connected."""
        self.everything += 1
        self._changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait (with the deadline) until `done()` holds."""
        async with asyncio.timeout(DEADLINE_S):
            while not done():
                self._changed.clear()
                await self._changed.wait()


async def test_a_change_folded_by_one_gateway_reaches_anothers_feed(
    postgres: PostgresHandle,
) -> None:
    url = postgres.database("feed")
    gateway_a, gateway_b = PgJobStore(url), PgJobStore(url)
    heard = Heard()
    feed = PgChangeFeed(url, heard, backoff_s=(0.05,))  # gateway b's feed
    try:
        await feed.start()
        assert feed.listening.is_set() and heard.everything == 1
        await asyncio.to_thread(gateway_a.create, new_job("j1", "d1"))
        await asyncio.to_thread(gateway_a.apply, event("parse", "started"))
        await heard.until(lambda: heard.jobs == ["j1"])
        job = await asyncio.to_thread(gateway_b.get, "j1")
        assert job is not None and job.status == "parsing"  # never ahead of the data

        error = JobError(stage="parse", code="bad", message="bad", retryable=True)
        await asyncio.to_thread(gateway_a.apply, event("parse", "failed", error=error))
        await asyncio.to_thread(gateway_a.reopen, "j1")
        await heard.until(lambda: heard.jobs == ["j1"] * 3)

        # The feed's connection dies: it listens again, wakes every follower (what changed
        # meanwhile was not heard), and hears what comes next.
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (APPLICATION_NAME,),
            )
        await heard.until(lambda: heard.everything == 2)
        await asyncio.to_thread(gateway_a.apply, event("chunk", "started"))
        await heard.until(lambda: heard.jobs[-1:] == ["j1"] and len(heard.jobs) == 4)
    finally:
        await feed.stop()
        gateway_a.close()
        gateway_b.close()


def test_the_settings_choose_the_feed(tmp_path: Path, postgres: PostgresHandle) -> None:
    heard = Heard()
    sqlite = Settings(data_dir=tmp_path)
    assert isinstance(open_change_feed(sqlite, heard), InProcessChangeFeed)
    shared = Settings(data_dir=tmp_path, job_store_url=postgres.url())
    assert isinstance(open_change_feed(shared, heard), PgChangeFeed)


def test_an_unreachable_database_is_a_transient_error_that_says_where() -> None:
    store = PgJobStore("postgresql://sluice@/jobs?host=/nonexistent-dir", timeout_s=0.3)
    try:
        with pytest.raises(Transient) as raised:
            store.ping()
        assert raised.value.code == "job_store_unavailable"
        assert "jobs on /nonexistent-dir" in raised.value.message
        assert "SLUICE_JOB_STORE_URL" in raised.value.message
        with pytest.raises(Transient):
            store.get("j1")
    finally:
        store.close()


# --- lanes: holding and fair admission --------------------------------------------------------


def lanes_store(backend: Backend, clock: Clock | None = None, **policy: Any) -> JobStore:
    """A store with lanes, small caps (unless `policy` says otherwise) and a fresh queue
    snapshot at every read."""
    caps = {"bulk_in_flight": 3, "interactive_per_collection": 2, **policy}
    return backend.open(clock=clock or Clock(), admission=Admission(**caps), queue_max_age_s=0)


def ends(store: JobStore, job_id: str, document_id: str) -> None:
    """The job is indexed (its last stage's only batch arrived)."""
    store.apply(event("index", job=job_id, document_id=document_id))


def admitted(store: JobStore) -> list[str]:
    """Admit what there is room for; the ids in the order admitted."""
    return [j.job_id for j in store.claim_admissions(30, 100)]


def test_a_held_job_whose_document_went_away_ends_instead_of_waiting_for_ever(
    backend: Backend,
) -> None:
    store = lanes_store(backend, bulk_in_flight=1)
    assert store.create(new_job("b0", "d0", priority="bulk")) is None
    assert admitted(store) == ["b0"]  # the lane is now full: the next ones wait
    assert store.create(new_job("old", "d1", priority="bulk")) is None
    assert store.create(new_job("gone", "d2", priority="bulk", callback_url="https://x/h")) is None
    # A new version replaces d1 before its first version got in; d2 is deleted.
    assert store.create(new_job("new", "d1", sha="other", replaces=True, priority="bulk")) is None
    store.delete_document("d2")

    assert admitted(store) == []  # still no room, but the orphans are settled
    for job_id in ("old", "gone"):
        job = get(store, job_id)
        assert (job.status, job.error.code, job.error.retryable) == ("failed", "superseded", False)
        assert job.queue.position is None
    assert get(store, "gone").webhook.status == "pending"  # its caller is told it ended
    assert get(store, "new").status == "queued" and get(store, "b0").status == "queued"
    ends(store, "b0", "d0")
    assert admitted(store) == ["new"]


def test_bulk_work_is_held_and_interactive_work_goes_in_at_once(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock)
    assert store.create(new_job("i1", "di1")) is None
    assert store.create(new_job("b1", "db1", priority="bulk")) is None
    assert store.is_admitted("i1") and not store.is_admitted("b1")
    assert not store.is_admitted("nope")
    interactive, bulk = get(store, "i1"), get(store, "b1")
    assert (interactive.priority, bulk.priority) == ("interactive", "bulk")
    assert interactive.admitted_at is not None and bulk.admitted_at is None
    assert bulk.status == "queued"

    # However long it waits, a held job is neither stalled nor a dead gateway's leftover.
    clock.advance(3600)
    assert not get(store, "b1").stalled
    assert [j.job_id for j in store.claim_unconfirmed(60, 30, 10)] == ["i1"]
    store.confirm("i1")

    assert admitted(store) == ["b1"]
    assert admitted(store) == []  # once is enough
    assert get(store, "b1").admitted_at is not None
    # Leased to its admitter while it publishes; if that gateway dies, the lease runs out
    # and the republisher sends it like any job admitted and never confirmed.
    assert store.claim_unconfirmed(60, 30, 10) == []
    clock.advance(61)
    assert [j.job_id for j in store.claim_unconfirmed(60, 30, 10)] == ["b1"]


def test_a_held_job_the_broker_cannot_take_is_forgotten_or_never_admitted(
    backend: Backend,
) -> None:
    store = lanes_store(backend)
    assert store.create(new_job("b1", "d1", priority="bulk")) is None
    assert store.forget("b1")  # its 202 was refused: the broker was away
    assert store.create(new_job("b2", "d2", priority="bulk")) is None
    assert store.create(new_job("b3", "d3", priority="bulk")) is None
    store.delete_document("d2")  # deleted while it waited: nothing to ingest
    assert store.create(new_job("b4", "d3", priority="bulk", replaces=True)) is None
    assert admitted(store) == ["b4"]  # b3 was replaced by a newer version
    assert get(store, "b2").queue.position is None


def test_admission_is_fair_between_collections_within_the_bulk_cap(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock)  # 3 bulk jobs in flight at most
    for n in range(5):
        assert store.create(new_job(f"a{n}", f"da{n}", "big", priority="bulk")) is None
        clock.advance(1)
    for n in range(2):
        assert store.create(new_job(f"b{n}", f"db{n}", "mid", priority="bulk")) is None
        clock.advance(1)
    assert store.create(new_job("c0", "dc0", "small", priority="bulk")) is None

    # Each turn goes to the collection with the fewest in flight, its oldest job first:
    # the late collections get in beside the big one's backlog, not after it.
    assert admitted(store) == ["a0", "b0", "c0"]
    assert admitted(store) == []  # the lane is full
    ends(store, "a0", "da0")
    assert admitted(store) == ["a1"]  # big has none in flight now, mid and small one each
    ends(store, "b0", "db0")
    assert admitted(store) == ["b1"]  # mid has none; big and small one each
    error = JobError(stage="parse", code="bad", message="bad", retryable=False)
    store.apply(event("parse", "failed", "c0", document_id="dc0", error=error))
    assert admitted(store) == ["a2"]  # small has nothing left: big takes the free slot
    assert admitted(store) == []
    for job_id, document_id in (("a1", "da1"), ("b1", "db1"), ("a2", "da2")):
        ends(store, job_id, document_id)
    assert admitted(store) == ["a3", "a4"]


def test_one_collections_interactive_flood_does_not_hold_anothers(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock)  # 2 interactive jobs in flight per collection
    for n in range(4):
        assert store.create(new_job(f"x{n}", f"dx{n}", "flood")) is None
        clock.advance(1)
    assert [store.is_admitted(f"x{n}") for n in range(4)] == [True, True, False, False]
    assert store.create(new_job("y0", "dy0", "calm")) is None
    assert store.is_admitted("y0")  # its own collection's cap, not the flood's
    assert store.create(new_job("b0", "db0", "calm", priority="bulk")) is None
    assert admitted(store) == ["b0"]  # the flood is at its cap; bulk has room
    ends(store, "x0", "dx0")
    # A slot came free: the oldest held job takes it, and a new upload waits behind it.
    assert store.create(new_job("x4", "dx4", "flood")) is None
    assert not store.is_admitted("x4")
    assert admitted(store) == ["x2"]
    ends(store, "x1", "dx1")
    ends(store, "x2", "dx2")
    assert admitted(store) == ["x3", "x4"]


def test_concurrent_admitters_never_overfill_the_lane(backend: Backend) -> None:
    clock = Clock()
    stores = [lanes_store(backend, clock, bulk_in_flight=5) for _ in range(3)]
    for n in range(30):
        job = new_job(f"b{n}", f"d{n}", f"c{n % 6}", priority="bulk")
        assert stores[0].create(job) is None
    claims = at_once(9, lambda i: [j.job_id for j in stores[i % 3].claim_admissions(30, 10)])
    taken = [job_id for claim in claims for job_id in claim]
    assert len(taken) == len(set(taken)) == 5, claims
    # One from each of five collections: fair even when claimed from three gateways at once.
    assert len({get(stores[0], job_id).collection for job_id in taken}) == 5


def test_with_lanes_off_nothing_is_held(backend: Backend) -> None:
    store = lanes_store(backend, lanes=False)
    for n in range(5):
        assert store.create(new_job(f"b{n}", f"d{n}", priority="bulk")) is None
        assert store.create(new_job(f"i{n}", f"e{n}")) is None
    assert all(store.is_admitted(j) for n in range(5) for j in (f"b{n}", f"i{n}"))
    assert admitted(store) == []


# --- lanes: queue places and ETA ---------------------------------------------------------------


def test_positions_count_the_lane_ahead_in_the_same_stage(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock, bulk_in_flight=1, interactive_per_collection=10)
    for n in range(3):
        assert store.create(new_job(f"i{n}", f"di{n}")) is None
        clock.advance(1)
    for job_id, collection in (("a0", "A"), ("a1", "A"), ("a2", "A"), ("a3", "A")):
        assert store.create(new_job(job_id, f"d{job_id}", collection, priority="bulk")) is None
        clock.advance(1)
    for job_id in ("b0", "b1"):
        assert store.create(new_job(job_id, f"d{job_id}", "B", priority="bulk")) is None
        clock.advance(1)

    def positions(*job_ids: str) -> list[int | None]:
        return [get(store, job_id).queue.position for job_id in job_ids]

    # Interactive work waits only for interactive work: the bulk backlog is not ahead of it.
    assert positions("i0", "i1", "i2") == [0, 1, 2]
    assert admitted(store) == ["a0"]
    # Held: the lane's admitted jobs waiting for the first stage (a0), then fair turns
    # (rank r in its collection, plus about r of every other collection's).
    assert positions("a0", "a1", "b0", "a2", "b1", "a3") == [0, 1, 1, 3, 3, 5]

    store.apply(event("parse", "started", "i0", document_id="di0"))
    assert positions("i0", "i1", "i2") == [0, 0, 1]  # i0 is in parse's hands
    store.apply(event("parse", "progress", "i0", document_id="di0"))  # parsed: waits for chunk
    store.apply(event("parse", "started", "i1", document_id="di1"))
    store.apply(event("parse", "progress", "i1", document_id="di1"))
    assert get(store, "i1").status == "chunking"
    # In line for chunk, i0 first; i2 still waits for parse with no one ahead.
    assert positions("i0", "i1", "i2") == [0, 1, 0]
    store.apply(event("chunk", "started", "i1", document_id="di1"))
    assert positions("i1") == [0]  # chunk has it: nothing is ahead any more

    # Listed, the jobs have the same places as one at a time (from one snapshot).
    listed = {j.job_id: j.queue for j in store.page(None, None, 50, None)[0]}
    assert {job_id: listed[job_id] for job_id in ("i0", "i1", "i2", "a1", "a3")} == {
        job_id: get(store, job_id).queue for job_id in ("i0", "i1", "i2", "a1", "a3")
    }
    ends(store, "i2", "di2")
    assert get(store, "i2").queue.model_dump() == {"position": None, "eta_s": None}


def test_eta_comes_from_how_fast_the_lane_drained_in_the_last_minute(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock, interactive_per_collection=10)
    for n in range(4):
        assert store.create(new_job(f"i{n}", f"d{n}")) is None
        clock.advance(1)
    assert get(store, "i3").queue.eta_s is None  # nothing ended yet: no rate to go by
    store.apply(event("parse", "progress", "i0", document_id="d0"))  # i0 went on to chunk
    ends(store, "i1", "d1")
    clock.advance(10)
    ends(store, "i2", "d2")
    # Two ended within the last 10 s (the shortest span a rate is taken over): 5 s a job,
    # not 30 (a minute that had only just begun). i3 has i0 ahead of it (further on).
    assert get(store, "i3").queue.eta_s == 10.0
    assert get(store, "i0").queue.eta_s == 5.0
    clock.advance(55)  # i1 ended more than a minute ago now; i2 55 s ago
    assert get(store, "i3").queue.eta_s == 110.0
    clock.advance(10)
    assert get(store, "i3").queue.eta_s is None
    # The bulk lane's rate is its own.
    assert store.create(new_job("b0", "db0", priority="bulk")) is None
    ends(store, "i0", "d0")
    assert get(store, "b0").queue.eta_s is None and get(store, "i3").queue.eta_s == 10.0


def test_with_lanes_off_positions_count_every_job(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock, lanes=False)
    in_order: tuple[Lane, ...] = ("bulk", "interactive", "bulk")
    for n, priority in enumerate(in_order):
        assert store.create(new_job(f"j{n}", f"d{n}", priority=priority)) is None
        clock.advance(1)
    assert [get(store, f"j{n}").queue.position for n in range(3)] == [0, 1, 2]


# --- lanes: webhooks ----------------------------------------------------------------------------

URL = "https://hooks.example/sluice?token=s3cret"


def webhook_event(kind: str, attempt: int = 1, message: str | None = None) -> JobEvent:
    """An event of the webhook side stage for job j1."""
    error = JobError(stage="webhook", code="http_503", message=message or "", retryable=True)
    return event("webhook", kind, attempt=attempt, error=error if message else None)


def test_an_ended_job_with_a_callback_has_its_webhook_claimed_once(backend: Backend) -> None:
    clock = Clock()
    store = lanes_store(backend, clock)
    assert store.create(new_job("j1", "d1", callback_url=URL)) is None
    assert store.create(new_job("j2", "d2")) is None  # no callback: no webhook, ever
    store.apply(webhook_event("progress"))  # nothing is due yet: ignored
    assert get(store, "j1").webhook is None
    assert store.claim_webhooks(30, 10) == []

    ends(store, "j2", "d2")
    clock.advance(1)
    ends(store, "j1", "d1")
    job = get(store, "j1")
    assert job.webhook is not None and job.webhook.model_dump() == {
        "status": "pending",
        "attempts": 0,
        "last_error": None,
        "round": 1,
    }
    assert "s3cret" not in job.model_dump_json()  # the URL may hold a token: never shown
    assert get(store, "j2").webhook is None

    ((claimed, url),) = store.claim_webhooks(30, 10)
    assert (claimed.job_id, url) == ("j1", URL)
    assert store.claim_webhooks(30, 10) == []  # leased to its claimer
    clock.advance(31)
    # The claimer died before it published: the next one gets it.
    assert [j.job_id for j, _ in store.claim_webhooks(30, 10)] == ["j1"]
    store.webhook_published("j1")
    clock.advance(31)
    assert store.claim_webhooks(30, 10) == []


def test_webhook_events_move_only_the_webhook(backend: Backend) -> None:
    store = lanes_store(backend)
    assert store.create(new_job("j1", "d1", callback_url=URL)) is None
    error = JobError(stage="embed", code="model_down", message="no model", retryable=True)
    store.apply(event("embed", "failed", error=error, attempt=2))
    before = get(store, "j1")

    def webhook() -> dict[str, Any]:
        job = get(store, "j1")
        # Status, error, stages and progress are the job's, whatever its webhook does.
        unchanged = ("status", "error", "stages", "progress", "updated_at")
        assert [getattr(job, f) for f in unchanged] == [getattr(before, f) for f in unchanged]
        assert job.webhook is not None
        state: dict[str, Any] = job.webhook.model_dump(exclude={"round"})
        return state

    store.apply(webhook_event("started"))
    assert webhook() == {"status": "pending", "attempts": 1, "last_error": None}
    store.apply(webhook_event("retrying", 1, "the receiver answered 503"))
    assert webhook() == {
        "status": "retrying",
        "attempts": 1,
        "last_error": "the receiver answered 503",
    }
    store.apply(webhook_event("failed", 12, "gave up after 12 attempts"))
    assert webhook() == {
        "status": "failed",
        "attempts": 12,
        "last_error": "gave up after 12 attempts",
    }
    store.apply(webhook_event("progress", 13))  # replayed from its dead letter, and sent
    assert webhook()["status"] == "delivered"
    store.apply(webhook_event("retrying", 12, "late"))  # a report from before: ignored
    assert webhook() == {
        "status": "delivered",
        "attempts": 13,
        "last_error": "gave up after 12 attempts",
    }
    assert "webhook" not in get(store, "j1").stages


def test_a_retried_job_is_told_again_when_it_ends_again(backend: Backend) -> None:
    store = lanes_store(backend)
    assert store.create(new_job("j1", "d1", callback_url=URL)) is None
    error = JobError(stage="index", code="disk_full", message="full", retryable=True)
    store.apply(event("index", "failed", error=error))
    reopened = store.reopen("j1")
    # Retried before its webhook went out: nothing is due until it ends again.
    assert reopened is not None and reopened.webhook is None
    assert store.claim_webhooks(30, 10) == []
    ends(store, "j1", "d1")
    ((job, _),) = store.claim_webhooks(30, 10)
    assert job.webhook is not None and (job.webhook.status, job.webhook.round) == ("pending", 2)
    assert job.status == "indexed"


def test_a_retry_counts_as_an_attempt_of_a_pipeline_stage_only(backend: Backend) -> None:
    store = lanes_store(backend)
    assert store.create(new_job("j1", "d1", callback_url=URL)) is None
    error = JobError(stage="parse", code="timeout", message="slow", retryable=True)
    store.apply(event("parse", "retrying", attempt=2, error=error))
    job = get(store, "j1")
    assert (job.status, job.error, job.stages["parse"].attempts) == ("parsing", None, 2)
    store.apply(webhook_event("retrying", 3, "not ended yet"))
    assert set(get(store, "j1").stages) == {"parse"} and get(store, "j1").webhook is None


def test_a_store_from_before_lanes_counts_its_jobs_admitted(postgres: PostgresHandle) -> None:
    url = postgres.database("before_lanes")
    with psycopg.connect(url) as conn:
        migrate(conn, COMPONENT, MIGRATIONS[:1])
        conn.execute(
            "INSERT INTO sluice_jobs (job_id, document_id, collection, filename, content_type,"
            " size_bytes, blob_sha256, status, created_at, updated_at) VALUES ('old', 'd-old',"
            " 'default', 'old.pdf', 'application/pdf', 1, 'x', 'queued', now(), now())"
        )
    store = PgJobStore(url, queue_max_age_s=0)
    try:
        job = get(store, "old")
        assert job.priority == "interactive" and job.admitted_at == job.created_at
        assert job.queue.position == 0 and store.is_admitted("old")
    finally:
        store.close()


def test_keys_from_before_owners_answer_in_their_collection(postgres: PostgresHandle) -> None:
    url = postgres.database("before_owners")
    with psycopg.connect(url) as conn:
        migrate(conn, COMPONENT, MIGRATIONS[:2])
        for job_id, document in (("old", "d-old"), ("gone", "d-gone")):
            conn.execute(
                "INSERT INTO sluice_jobs (job_id, document_id, collection, filename,"
                " content_type, size_bytes, blob_sha256, status, idempotency_key, created_at,"
                " updated_at) VALUES (%s, %s, 'default', 'old.pdf', 'application/pdf', 1,"
                " 'old-bytes', 'indexed', %s, now(), now())",
                (job_id, document, f"{job_id}-key"),
            )
        # Only d-old is still there: d-gone was deleted, its key never freed then.
        conn.execute("INSERT INTO sluice_documents VALUES ('d-old', 'default', 'old', now())")
    store = PgJobStore(url)
    try:
        # Its owner was not recorded: in its collection it answers whoever may use it.
        for owner in (OPEN_KEY_OWNER, "fingerprint-of-a-key"):
            again = store.create(new_job("n1", "dn1", sha="old-bytes", key="old-key", owner=owner))
            assert again is not None and again.job_id == "old"
            with pytest.raises(IdempotencyKeyReused):
                store.create(new_job("n2", "dn2", sha="other", key="old-key", owner=owner))
        # No longer unique in the whole table: elsewhere two owners use it.
        assert store.create(new_job("n3", "dn3", "other", key="old-key", owner="alice")) is None
        assert store.create(new_job("n4", "dn4", "other", key="old-key", owner="bob")) is None
        # A deleted document's key is free.
        assert store.create(new_job("n5", "dn5", key="gone-key")) is None
    finally:
        store.close()


# --- deleting a document while its work is under way -------------------------------------------


def test_a_deleted_document_is_known_by_its_history_and_its_unended_jobs_end(
    backend: Backend,
) -> None:
    store = backend.open()
    assert store.create(new_job("j1", "d1", callback_url=URL)) is None
    store.apply(event("parse", "started"))
    assert store.create(new_job("j2", "d2", collection="red")) is None
    ends(store, "j2", "d2")
    assert store.end_deleted_jobs("d1") == []  # a live document's jobs are left alone
    assert get(store, "j1").status == "parsing"

    store.delete_document("d1")
    store.delete_document("d2")
    assert store.document_collection("d1") is None
    assert (store.recorded_collection("d1"), store.recorded_collection("d2")) == ("default", "red")
    assert store.recorded_collection("never") is None
    assert store.end_deleted_jobs("d1") == ["j1"]
    assert store.end_deleted_jobs("d1") == []  # ended once
    assert store.end_deleted_jobs("d2") == []  # indexed before it was deleted: history
    assert get(store, "j2").status == "indexed"

    job = get(store, "j1")
    assert (job.status, job.error.stage, job.error.code, job.error.retryable) == (
        "failed",
        "parse",
        "document_deleted",
        False,
    )
    assert job.error.message.strip()
    assert job.webhook is not None and job.webhook.status == "pending"  # its caller is told
    # What its stages still report (the index drops their batches) cannot revive it.
    store.apply(event("parse", pages=1, parsed_sha256="b" * 64))
    store.apply(event("chunk", chunks_total=1, batch_count=1))
    store.apply(event("embed", chunks=1))
    store.apply(event("index", chunks=1))
    assert get(store, "j1").status == "failed"
    assert get(store, "j1").error.code == "document_deleted"
    # Another gateway knows it the same way.
    assert backend.open().recorded_collection("d1") == "default"


def test_a_new_version_of_a_document_deleted_meanwhile_is_refused(backend: Backend) -> None:
    # PUT checked that the document exists, then read the upload; a DELETE came in between.
    store = backend.open()
    assert store.create(new_job("j1", "d1")) is None
    store.delete_document("d1")
    with pytest.raises(DocumentGone) as refused:
        store.create(new_job("j2", "d1", replaces=True))
    assert refused.value.code == "document_not_found"
    assert store.document_collection("d1") is None  # not brought back
    assert store.get("j2") is None and all_jobs(store) == ["j1"]
