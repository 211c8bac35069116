"""The job store: jobs, their per-stage progress, and documents — SQLite, knowing nothing of HTTP.

The tracker feeds it job events. Progress is counted per unit of work (stage, batch index),
so an event delivered twice never counts twice. Every write holds SQLite's write lock from
its first statement (BEGIN IMMEDIATE), so `create`'s check for a duplicate and its insert
are one step for every writer of the file. Calls block on disk: the gateway makes them
from a worker thread (`asyncio.to_thread`), never on its event loop.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.events import JobEvent
from contracts.pipeline import Pipeline, default_pipeline
from gateway.http.schemas import Job
from gateway.store import states
from gateway.store.base import JobBlobs, NewJob
from gateway.store.job_rows import decode_cursor, encode_cursor, job_of, state_of
from gateway.store.states import TERMINAL, JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    document_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    current_job_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    document_id TEXT NOT NULL,
    collection TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    blob_sha256 TEXT NOT NULL,
    parsed_sha256 TEXT,
    status TEXT NOT NULL,
    pages INTEGER,
    chunks_total INTEGER,
    error TEXT,
    language TEXT,
    idempotency_key TEXT UNIQUE,
    trace_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    confirmed_at TEXT,
    lease_until TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_bytes ON jobs (collection, blob_sha256);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC, job_id DESC);
CREATE TABLE IF NOT EXISTS job_stages (
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    units_done INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, stage)
);
CREATE TABLE IF NOT EXISTS job_units (
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    batch_count INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    PRIMARY KEY (job_id, stage, batch_index)
);
"""
# After the migrations: an index on a column an older store gets from them.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_unconfirmed ON jobs (created_at) WHERE confirmed_at IS NULL;
"""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqliteJobStore:
    """The job store in one SQLite file (WAL), shared by the gateway's routes and its tracker."""

    def __init__(
        self,
        path: Path,
        *,
        pipeline: Pipeline | None = None,
        stalled_after_s: float = 600.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.pipeline = pipeline or default_pipeline()
        self.stalled_after_s = stalled_after_s
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # The wait first: another process may hold the file while this one sets it up.
        self._db.execute("PRAGMA busy_timeout=5000")
        _use_wal(self._db)
        # One write transaction, so two processes opening a new file at once cannot collide.
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        _migrate(self._db)
        self._db.executescript(_INDEXES)
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _now(self) -> str:
        return self._clock().isoformat()

    def _stalled_before(self) -> str:
        # updated_at is always written by `_now`, so ISO strings compare like the times they name.
        return (self._clock() - timedelta(seconds=self.stalled_after_s)).isoformat()

    def create(self, job: NewJob) -> Job | None:
        """Record an unconfirmed job, unless a duplicate exists: then return it, writing nothing."""
        now = self._now()
        try:
            with self._tx() as db:
                # BEGIN IMMEDIATE holds the write lock from here: no other writer, in this
                # process or another, can insert between this check and the insert below.
                duplicate = self._duplicate(db, job)
                if duplicate is not None:
                    return self._job(duplicate)
                self._insert(db, job, now)
        except sqlite3.IntegrityError:
            # The unique key is the backstop: if a writer still won the race, its job is
            # the answer, as if the check had seen it.
            with self._lock:
                winner = self._db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                ).fetchone()
                if winner is None:
                    raise
                return self._job(winner)
        return None

    def _insert(self, db: sqlite3.Connection, job: NewJob, now: str) -> None:
        db.execute(
            "INSERT INTO jobs (job_id, document_id, collection, filename, content_type,"
            " size_bytes, blob_sha256, status, idempotency_key, trace_id, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
            (
                job.job_id,
                job.document_id,
                job.collection,
                job.filename,
                job.content_type,
                job.size_bytes,
                job.blob_sha256,
                job.idempotency_key,
                job.trace_id,
                now,
                now,
            ),
        )
        db.execute(
            "INSERT INTO documents (document_id, collection, current_job_id, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (document_id)"
            " DO UPDATE SET current_job_id = excluded.current_job_id",
            (job.document_id, job.collection, job.job_id, now),
        )

    def _duplicate(self, db: sqlite3.Connection, job: NewJob) -> sqlite3.Row | None:
        if job.idempotency_key:
            by_key = "SELECT * FROM jobs WHERE idempotency_key = ?"
            row: sqlite3.Row | None = db.execute(by_key, (job.idempotency_key,)).fetchone()
            if row is not None:
                return row
        live_same_bytes = (
            "SELECT j.* FROM jobs j JOIN documents d ON d.current_job_id = j.job_id"
            " WHERE j.blob_sha256 = ? AND j.status != 'failed'"
        )
        if job.replaces:
            # A new version repeats only its own document's current bytes.
            sql, scope = f"{live_same_bytes} AND d.document_id = ?", job.document_id
        else:
            sql, scope = (
                f"{live_same_bytes} AND j.collection = ? ORDER BY j.created_at",
                job.collection,
            )
        row = db.execute(f"{sql} LIMIT 1", (job.blob_sha256, scope)).fetchone()
        return row

    def confirm(self, job_id: str) -> None:
        """The broker confirmed the job's first message: it is in the pipeline."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET confirmed_at = COALESCE(confirmed_at, ?) WHERE job_id = ?",
                (self._now(), job_id),
            )

    def is_confirmed(self, job_id: str) -> bool:
        """Whether the job's first message was confirmed (False for an unknown job)."""
        with self._lock:
            row = self._db.execute(
                "SELECT confirmed_at FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return row is not None and row["confirmed_at"] is not None

    def claim_unconfirmed(self, older_than_s: float, lease_s: float, limit: int) -> list[Job]:
        """Old unconfirmed jobs no one holds, each leased for `lease_s` to the caller."""
        now = self._clock()
        with self._tx() as db:
            # Only a document's current version: a deleted or replaced one is not worth
            # publishing (it would bring a deleted document back into the index).
            rows = db.execute(
                "SELECT j.job_id FROM jobs j JOIN documents d ON d.current_job_id = j.job_id"
                " WHERE j.confirmed_at IS NULL AND j.created_at < ?"
                " AND (j.lease_until IS NULL OR j.lease_until <= ?)"
                " ORDER BY j.created_at LIMIT ?",
                ((now - timedelta(seconds=older_than_s)).isoformat(), now.isoformat(), limit),
            ).fetchall()
            ids = [str(r["job_id"]) for r in rows]
            until = (now + timedelta(seconds=lease_s)).isoformat()
            db.executemany(
                "UPDATE jobs SET lease_until = ? WHERE job_id = ?", [(until, i) for i in ids]
            )
            return [self._job(r) for i in ids if (r := self._row(db, i)) is not None]

    def forget(self, job_id: str) -> bool:
        """Remove an unconfirmed, never claimed job, and its document if it had no other job."""
        with self._tx() as db:
            row = db.execute(
                "SELECT document_id FROM jobs WHERE job_id = ?"
                " AND confirmed_at IS NULL AND lease_until IS NULL",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            for table in ("jobs", "job_stages", "job_units"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            document_id = row["document_id"]
            current = db.execute(
                "SELECT current_job_id FROM documents WHERE document_id = ?", (document_id,)
            ).fetchone()
            if current is None or current["current_job_id"] != job_id:
                return True  # deleted meanwhile, or a newer version is current: leave it
            previous = db.execute(
                "SELECT job_id FROM jobs WHERE document_id = ? ORDER BY created_at DESC LIMIT 1",
                (document_id,),
            ).fetchone()
            if previous is None:
                db.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
            else:
                db.execute(
                    "UPDATE documents SET current_job_id = ? WHERE document_id = ?",
                    (previous["job_id"], document_id),
                )
        return True

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        return row

    def get(self, job_id: str) -> Job | None:
        """One job with its progress and stage timings."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def page(
        self,
        status: str | None,
        collection: str | None,
        limit: int,
        cursor: str | None,
        *,
        collections: frozenset[str] | None = None,
        stalled: bool | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered, a page at a time; the cursor is opaque to clients.

        `collections` limits the listing to those (None: every one); `stalled` keeps only
        stalled (True) or only not-stalled (False) jobs.
        """
        where: list[str] = []
        args: list[object] = []
        if status:
            where.append("status = ?")
            args.append(status)
        if collection:
            where.append("collection = ?")
            args.append(collection)
        if collections is not None:
            where.append(f"collection IN ({', '.join('?' * len(collections))})")
            args += sorted(collections)
        if stalled is not None:
            condition = "(status NOT IN ('indexed', 'failed') AND updated_at < ?)"
            where.append(condition if stalled else f"NOT {condition}")
            args.append(self._stalled_before())
        if cursor:
            created_at, job_id = decode_cursor(cursor)
            where.append("(created_at, job_id) < (?, ?)")
            args += [created_at, job_id]
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
            jobs = [self._job(r) for r in rows[:limit]]
        more = len(rows) > limit
        last = rows[limit - 1] if more and limit else None
        next_cursor = encode_cursor(last["created_at"], last["job_id"]) if last else None
        return jobs, next_cursor

    def find_duplicate(
        self, collection: str, blob_sha256: str, idempotency_key: str | None
    ) -> Job | None:
        """The live job for the same key, or for the same bytes in a live document of the
        collection (a failed one does not count: uploading again is how people retry)."""
        probe = NewJob("", "", collection, "", "", 0, blob_sha256, idempotency_key)
        with self._lock:
            row = self._duplicate(self._db, probe)
            return self._job(row) if row else None

    def collections_of(self, job_ids: Collection[str]) -> dict[str, str]:
        """The collection of each known job among `job_ids`."""
        ids = sorted(set(job_ids))
        found: dict[str, str] = {}
        with self._lock:
            # In batches, to stay under SQLite's limit on bound parameters.
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                rows = self._db.execute(
                    "SELECT job_id, collection FROM jobs"
                    f" WHERE job_id IN ({', '.join('?' * len(batch))})",
                    batch,
                ).fetchall()
                found.update({str(r["job_id"]): str(r["collection"]) for r in rows})
        return found

    def document_collection(self, document_id: str) -> str | None:
        """The collection of a live document, or None if there is no such document."""
        with self._lock:
            row = self._db.execute(
                "SELECT collection FROM documents WHERE document_id = ?", (document_id,)
            ).fetchone()
        return str(row["collection"]) if row else None

    def current_job(self, document_id: str) -> Job | None:
        """The job of a document's current version."""
        with self._lock:
            row = self._db.execute(
                "SELECT j.* FROM jobs j JOIN documents d ON d.current_job_id = j.job_id"
                " WHERE d.document_id = ?",
                (document_id,),
            ).fetchone()
            return self._job(row) if row else None

    def delete_document(self, document_id: str) -> list[JobBlobs]:
        """Forget a document (its jobs stay as history); returns the blobs its jobs wrote."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT blob_sha256, parsed_sha256 FROM jobs WHERE document_id = ?", (document_id,)
            ).fetchall()
            db.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
        return [JobBlobs(r["blob_sha256"], r["parsed_sha256"]) for r in rows]

    def blob_in_use(self, sha256: str) -> bool:
        """Whether a live document's job still needs this blob (blobs are shared by content)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs j JOIN documents d ON d.document_id = j.document_id"
                " WHERE j.blob_sha256 = ? OR j.parsed_sha256 = ? LIMIT 1",
                (sha256, sha256),
            ).fetchone()
        return row is not None

    def apply(self, event: JobEvent) -> bool:
        """Fold one event into its job; returns whether anything changed."""
        return bool(self.apply_all([event]))

    def apply_all(self, events: Sequence[JobEvent]) -> set[str]:
        """Fold events into their jobs in one transaction (one disk sync for the lot);
        returns the ids of the jobs that changed."""
        changed: set[str] = set()
        with self._tx() as db:
            for event in events:
                if self._fold(db, event):
                    changed.add(event.job_id)
        return changed

    def _fold(self, db: sqlite3.Connection, event: JobEvent) -> bool:
        row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (event.job_id,)).fetchone()
        if row is None:
            return False
        # The unit's primary key decides whether it counts: a redelivered event adds nothing.
        new_unit = (
            event.kind == "progress"
            and db.execute(
                "INSERT OR IGNORE INTO job_units"
                " (job_id, stage, batch_index, batch_count, chunks) VALUES (?, ?, ?, ?, ?)",
                (event.job_id, event.stage, event.batch_index, event.batch_count, event.chunks),
            ).rowcount
            == 1
        )
        before = self._state(db, row)
        after = states.fold(before, event, new_unit=new_unit, pipeline=self.pipeline)
        self._save(db, event.job_id, after, event.stage)
        return True

    def _state(self, db: sqlite3.Connection, row: sqlite3.Row) -> JobState:
        stages = db.execute("SELECT * FROM job_stages WHERE job_id = ?", (row["job_id"],))
        return state_of(row, stages.fetchall())

    def _save(self, db: sqlite3.Connection, job_id: str, state: JobState, stage: str) -> None:
        now = self._now()
        # A stage's event proves the broker had the job's first message, even if the gateway
        # that published it died before it could confirm: no one needs to publish it again.
        db.execute(
            "UPDATE jobs SET status = ?, error = ?, pages = ?, chunks_total = ?,"
            " parsed_sha256 = ?, language = ?, updated_at = ?,"
            " confirmed_at = COALESCE(confirmed_at, ?) WHERE job_id = ?",
            (
                state.status,
                state.error.model_dump_json() if state.error else None,
                state.pages,
                state.chunks_total,
                state.parsed_sha256,
                state.language,
                now,
                now,
                job_id,
            ),
        )
        part = state.stages[stage]
        db.execute(
            "INSERT INTO job_stages"
            " (job_id, stage, started_at, finished_at, attempts, units_done, chunks)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, stage) DO UPDATE SET"
            " started_at = excluded.started_at, finished_at = excluded.finished_at,"
            " attempts = excluded.attempts, units_done = excluded.units_done,"
            " chunks = excluded.chunks",
            (
                job_id,
                stage,
                _iso(part.started_at),
                _iso(part.finished_at),
                part.attempts,
                part.units_done,
                part.chunks,
            ),
        )

    def reopen(self, job_id: str) -> Job | None:
        """Put a failed job back in flight at the stage that failed (for a retry)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = states.reopened(self._state(db, row), self.pipeline)
            if state is None:
                return None
            db.execute(
                "UPDATE jobs SET status = ?, error = NULL, updated_at = ? WHERE job_id = ?",
                (state.status, self._now(), job_id),
            )
        return self.get(job_id)

    def ping(self) -> None:
        """Raise if the store cannot be read."""
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            return {str(status): int(n) for status, n in rows.fetchall()}

    def _job(self, row: sqlite3.Row) -> Job:
        stages = self._db.execute("SELECT * FROM job_stages WHERE job_id = ?", (row["job_id"],))
        stalled = row["status"] not in TERMINAL and row["updated_at"] < self._stalled_before()
        return job_of(row, stages.fetchall(), self.pipeline, stalled=stalled)


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to write-ahead logging (it stays so), waiting out other openers."""
    for attempt in range(100):
        if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            # The switch needs the file to itself and SQLite does not apply busy_timeout to
            # it: two processes opening a new file at once would otherwise fail one of them.
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# Stores written before a column existed get it added, counted from what they already hold.
_MIGRATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "job_stages",
        "units_done",
        (
            "ALTER TABLE job_stages ADD COLUMN units_done INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE job_stages ADD COLUMN chunks INTEGER NOT NULL DEFAULT 0",
            "UPDATE job_stages SET"
            " units_done = (SELECT COUNT(*) FROM job_units u"
            "  WHERE u.job_id = job_stages.job_id AND u.stage = job_stages.stage),"
            " chunks = (SELECT COALESCE(SUM(chunks), 0) FROM job_units u"
            "  WHERE u.job_id = job_stages.job_id AND u.stage = job_stages.stage)",
        ),
    ),
    ("jobs", "language", ("ALTER TABLE jobs ADD COLUMN language TEXT",)),
    (
        "jobs",
        "confirmed_at",
        (
            "ALTER TABLE jobs ADD COLUMN confirmed_at TEXT",
            "ALTER TABLE jobs ADD COLUMN lease_until TEXT",
            # Jobs recorded before confirmations existed were answered 202 only once the broker
            # had them: they count as confirmed.
            "UPDATE jobs SET confirmed_at = created_at",
        ),
    ),
)


def _migrate(db: sqlite3.Connection) -> None:
    for table, column, statements in _MIGRATIONS:
        # Checked inside the write transaction, so of two processes upgrading one file at
        # once the second sees the column the first added.
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                for statement in statements:
                    db.execute(statement)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
