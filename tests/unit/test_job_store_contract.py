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
from contracts.settings import Settings
from gateway.store.base import JobStore, NewJob
from gateway.store.changes import (
    APPLICATION_NAME,
    InProcessChangeFeed,
    PgChangeFeed,
    open_change_feed,
)
from gateway.store.job_store import SqliteJobStore
from gateway.store.pg_job_store import PgJobStore

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
) -> NewJob:
    """A job about to be queued; its bytes are its own unless `sha` says otherwise."""
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
    store.apply(event("parse", parsed_sha256="parsed-1"))
    assert store.blob_in_use("sha-of-j1") and store.blob_in_use("parsed-1")
    blobs = store.delete_document("d1")
    assert {(b.blob_sha256, b.parsed_sha256) for b in blobs} == {
        ("sha-of-j1", "parsed-1"),
        ("sha-of-j2", None),
    }
    assert store.document_collection("d1") is None and store.current_job("d1") is None
    assert not store.blob_in_use("sha-of-j1") and not store.blob_in_use("parsed-1")
    assert get(store, "j1").job_id == "j1"  # jobs stay, as history
    store.ping()


# --- accepting uploads: duplicates, confirmation, recovery ------------------------------------


def test_create_returns_a_duplicate_and_writes_nothing(backend: Backend) -> None:
    store = backend.open()
    assert store.create(new_job("a", "da", sha="X", key="key-1")) is None
    before = all_jobs(store)

    # The same Idempotency-Key: that job, whatever the bytes or the collection.
    same_key = store.create(new_job("b", "db", "other", sha="Y", key="key-1"))
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
        if same == "key":  # a client retrying: same key, and here even other bytes
            job = new_job(f"j{i}", f"d{i}", sha=f"bytes-{i}", key="one-key")
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
        assert stores[0].create(new_job(f"j{n}", f"d{n}")) is None
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
