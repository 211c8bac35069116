"""The job store: jobs, their per-stage progress, and documents — SQLite, knowing nothing of HTTP.

The tracker feeds it job events. Progress is counted per unit of work (stage, batch index),
so an event delivered twice never counts twice. Every write holds SQLite's write lock from
its first statement (BEGIN IMMEDIATE), so `create`'s check for a duplicate and its insert
are one step for every writer of the file (and so is admitting held jobs: two admitters
never fill one free slot). Calls block on disk: the gateway makes them from a worker thread
(`asyncio.to_thread`), never on its event loop. The file's tables are in sqlite_schema.py;
the queries for lanes (holding, fair admission, queue places, webhooks) in sqlite_lanes.py.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.errors import StorageFull
from contracts.events import JobEvent
from contracts.pipeline import Pipeline, default_pipeline
from gateway.http.schemas import Job
from gateway.store import sqlite_lanes as lanes
from gateway.store import states
from gateway.store.base import (
    LEGACY_KEY_OWNER,
    OPEN_KEY_OWNER,
    Admission,
    CollectionCounts,
    DocumentGone,
    IdempotencyKeyReused,
    JobBlobs,
    NewJob,
)
from gateway.store.job_rows import (
    decode_cursor,
    encode_cursor,
    job_of,
    state_of,
    webhook_of,
)
from gateway.store.queue_place import QueueSnapshot, QueueSnapshots
from gateway.store.reindex_queries import profile_of
from gateway.store.sqlite_reindex import SqliteReindexes
from gateway.store.sqlite_schema import open_database
from gateway.store.states import TERMINAL, JobState

# A collection's documents, its serving generation and profile, and the chunks of its
# documents in that generation: each document's newest job there, if it is indexed (an
# upload's, or a reindex's once the collection switched to the generation it built).
_COLLECTIONS = (
    "SELECT d.collection, COUNT(*), COALESCE(MAX(c.generation), 0), MAX(c.profile),"
    " COALESCE(SUM(CASE WHEN k.status = 'indexed' THEN k.chunks_total ELSE 0 END), 0)"
    " FROM documents d LEFT JOIN collections c ON c.collection = d.collection"
    " LEFT JOIN jobs k ON k.job_id = (SELECT v.job_id FROM jobs v"
    "  WHERE v.document_id = d.document_id AND v.generation = COALESCE(c.generation, 0)"
    "  ORDER BY v.created_at DESC, v.job_id DESC LIMIT 1)"
    " GROUP BY d.collection ORDER BY d.collection"
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqliteJobStore(SqliteReindexes):
    """The job store in one SQLite file (WAL), shared by the gateway's routes and its tracker."""

    def __init__(
        self,
        path: Path,
        *,
        pipeline: Pipeline | None = None,
        stalled_after_s: float = 600.0,
        clock: Callable[[], datetime] = _utc_now,
        admission: Admission | None = None,
        queue_max_age_s: float = 1.0,
    ) -> None:
        self.pipeline = pipeline or default_pipeline()
        self.stalled_after_s = stalled_after_s
        self.admission = admission or Admission()
        self._clock = clock
        self._path = path
        self._db = open_database(path)
        self._lock = threading.RLock()
        self._queue = QueueSnapshots(self._take_snapshot, queue_max_age_s)

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._full_disk_is_transient():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has rolled back already after some errors (a full disk): then there
                # is nothing left to roll back, and trying would hide the error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _full_disk_is_transient(self) -> Iterator[None]:
        """SQLITE_FULL as `StorageFull`: the write is tried again once there is space (an
        upload is answered 507, the tracker folds its events again), nothing half-written."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            raise StorageFull(
                f"the job store {self._path} has no space left: free space on its disk "
                "(SLUICE_DATA_DIR)"
            ) from exc

    def _now(self) -> str:
        return self._clock().isoformat()

    def _stalled_before(self) -> str:
        # updated_at is always written by `_now`, so ISO strings compare like the times they name.
        return (self._clock() - timedelta(seconds=self.stalled_after_s)).isoformat()

    def create(self, job: NewJob) -> Job | None:
        """Record an unconfirmed job, unless a duplicate exists: then return it, writing nothing
        (`IdempotencyKeyReused` for its key with other bytes)."""
        for attempt in (1, 2):
            try:
                with self._tx() as db:
                    # BEGIN IMMEDIATE holds the write lock from here: no other writer, in this
                    # process or another, can insert between this check and the insert below.
                    if job.replaces and not _is_live(db, job.document_id):
                        raise DocumentGone(job.document_id)
                    duplicate = self._duplicate(db, job)
                    if duplicate is not None:
                        return self._job(duplicate)
                    admitted = lanes.admits_at_once(db, job, self.admission)
                    self._insert(db, job, self._now(), admitted=admitted)
                return None
            except sqlite3.IntegrityError:
                # The unique key is only the backstop (the check above sees every writer):
                # should a writer still have won, the check, run once more, answers with its
                # job. A second failure is no race (a job id recorded twice): it is raised.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _insert(self, db: sqlite3.Connection, job: NewJob, now: str, *, admitted: bool) -> None:
        db.execute(
            "INSERT INTO jobs (job_id, document_id, collection, filename, content_type,"
            " size_bytes, blob_sha256, status, idempotency_key, key_owner, trace_id,"
            " created_at, updated_at, priority, callback_url, admitted_at, stage_since,"
            " generation) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            # The generation its messages build: the collection's serving one (the switch
            # waits for every admitted upload; a held one is stamped again when admitted).
            " COALESCE((SELECT generation FROM collections WHERE collection = ?), 0))",
            (
                job.job_id,
                job.document_id,
                job.collection,
                job.filename,
                job.content_type,
                job.size_bytes,
                job.blob_sha256,
                job.idempotency_key or None,
                job.key_owner if job.idempotency_key else None,
                job.trace_id,
                now,
                now,
                job.priority,
                job.callback_url,
                now if admitted else None,
                now,
                job.collection,
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
            # The key's first job, if it had the same bytes; a key is its owner's, in one
            # collection (a legacy key, of no recorded owner, answers anyone there).
            row: sqlite3.Row | None = db.execute(
                "SELECT * FROM jobs WHERE collection = ? AND idempotency_key = ?"
                " AND key_owner IN (?, ?) ORDER BY created_at LIMIT 1",
                (job.collection, job.idempotency_key, job.key_owner, LEGACY_KEY_OWNER),
            ).fetchone()
            if row is not None:
                if row["blob_sha256"] != job.blob_sha256:
                    raise IdempotencyKeyReused(job.idempotency_key, row["job_id"])
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

    def is_admitted(self, job_id: str) -> bool:
        """Whether the job was let into the pipeline (False while held, or unknown)."""
        with self._lock:
            row = self._db.execute(
                "SELECT admitted_at FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return row is not None and row["admitted_at"] is not None

    def claim_admissions(self, lease_s: float, limit: int) -> list[Job]:
        """Admit the held jobs fair share picks now, each leased for `lease_s`, in order."""
        now = self._clock()
        with self._tx() as db:
            lanes.retire_superseded(db, now, states.superseded(self.pipeline))
            ids = lanes.claim_admissions(db, self.admission, now, lease_s, limit)
            return [self._job(r) for i in ids if (r := self._row(db, i)) is not None]

    def claim_unconfirmed(self, older_than_s: float, lease_s: float, limit: int) -> list[Job]:
        """Jobs admitted long ago and never confirmed that no one holds, each leased for
        `lease_s` to the caller."""
        now = self._clock()
        with self._tx() as db:
            # Only a document's current version: a deleted or replaced one is not worth
            # publishing (it would bring a deleted document back into the index). Held jobs
            # (admitted_at NULL) wait for the admitter, not for this.
            rows = db.execute(
                "SELECT j.job_id FROM jobs j JOIN documents d ON d.current_job_id = j.job_id"
                " WHERE j.confirmed_at IS NULL AND j.admitted_at < ?"
                " AND (j.lease_until IS NULL OR j.lease_until <= ?)"
                " ORDER BY j.admitted_at LIMIT ?",
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
        """One job with its progress, stage timings and place in the queue."""
        queue = self._queue.current()
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return self._job(row, queue) if row else None

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
            condition = (
                "(status NOT IN ('indexed', 'failed') AND admitted_at IS NOT NULL"
                " AND updated_at < ?)"
            )
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
        queue = self._queue.current()
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
            jobs = [self._job(r, queue) for r in rows[:limit]]
        more = len(rows) > limit
        last = rows[limit - 1] if more and limit else None
        next_cursor = encode_cursor(last["created_at"], last["job_id"]) if last else None
        return jobs, next_cursor

    def find_duplicate(
        self,
        collection: str,
        blob_sha256: str,
        idempotency_key: str | None,
        *,
        key_owner: str = OPEN_KEY_OWNER,
    ) -> Job | None:
        """The job of the owner's same key in the collection, or for the same bytes in a live
        document of the collection (a failed one does not count: uploading again is how
        people retry); `IdempotencyKeyReused` for the key with other bytes."""
        probe = NewJob(
            "", "", collection, "", "", 0, blob_sha256, idempotency_key, key_owner=key_owner
        )
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
        queue = self._queue.current()
        with self._lock:
            row = self._db.execute(
                "SELECT j.* FROM jobs j JOIN documents d ON d.current_job_id = j.job_id"
                " WHERE d.document_id = ?",
                (document_id,),
            ).fetchone()
            return self._job(row, queue) if row else None

    def delete_document(self, document_id: str) -> list[JobBlobs]:
        """Forget a document (its jobs stay as history) and free its jobs' Idempotency-Keys;
        returns the blobs its jobs wrote."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT job_id, blob_sha256, parsed_sha256 FROM jobs WHERE document_id = ?",
                (document_id,),
            ).fetchall()
            db.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
            db.execute(
                "UPDATE jobs SET idempotency_key = NULL, key_owner = NULL WHERE document_id = ?",
                (document_id,),
            )
        return [JobBlobs(r["blob_sha256"], r["parsed_sha256"], r["job_id"]) for r in rows]

    def recorded_collection(self, document_id: str) -> str | None:
        """The collection of a live document, or of a deleted one by its jobs' history."""
        with self._lock:
            row = self._db.execute(
                "SELECT collection FROM documents WHERE document_id = ?"
                " UNION ALL SELECT collection FROM jobs WHERE document_id = ? LIMIT 1",
                (document_id, document_id),
            ).fetchone()
        return str(row["collection"]) if row else None

    def end_deleted_jobs(self, document_id: str) -> list[str]:
        """End the unended jobs of a deleted document (`document_deleted`); their ids."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT job_id, status FROM jobs WHERE document_id = ?"
                " AND status NOT IN ('indexed', 'failed')"
                " AND NOT EXISTS (SELECT 1 FROM documents WHERE document_id = ?)",
                (document_id, document_id),
            ).fetchall()
            now = self._now()
            for row in rows:
                error = states.document_deleted(self.pipeline, row["status"])
                # Its webhook is due like any ended job's (as `retire_superseded` does).
                db.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, updated_at = ?,"
                    " stage_since = ?, webhook_status = CASE WHEN callback_url IS NULL"
                    " THEN webhook_status ELSE 'pending' END,"
                    " webhook_round = webhook_round + (callback_url IS NOT NULL),"
                    " webhook_attempts = 0, webhook_last_error = NULL,"
                    " webhook_published_at = NULL, webhook_lease_until = NULL WHERE job_id = ?",
                    (error.model_dump_json(), now, now, row["job_id"]),
                )
        return [str(row["job_id"]) for row in rows]

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
        if states.is_side(self.pipeline, event):
            return self._fold_webhook(db, row, event)
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
        self._save(db, row, before, after, event.stage)
        return True

    def _fold_webhook(self, db: sqlite3.Connection, row: sqlite3.Row, event: JobEvent) -> bool:
        webhook = states.webhook_after(webhook_of(row), event)
        if webhook is None or webhook == webhook_of(row):
            return False
        db.execute(
            "UPDATE jobs SET webhook_status = ?, webhook_attempts = ?, webhook_last_error = ?"
            " WHERE job_id = ?",
            (webhook.status, webhook.attempts, webhook.last_error, row["job_id"]),
        )
        return True

    def _state(self, db: sqlite3.Connection, row: sqlite3.Row) -> JobState:
        stages = db.execute("SELECT * FROM job_stages WHERE job_id = ?", (row["job_id"],))
        return state_of(row, stages.fetchall())

    def _save(
        self,
        db: sqlite3.Connection,
        row: sqlite3.Row,
        before: JobState,
        state: JobState,
        stage: str,
    ) -> None:
        now = self._now()
        job_id = row["job_id"]
        if state.status != before.status:
            db.execute("UPDATE jobs SET stage_since = ? WHERE job_id = ?", (now, job_id))
        if states.ended(before, state) and row["callback_url"]:
            # Its webhook is due: a new round, so a job retried and ended again is told again.
            db.execute(
                "UPDATE jobs SET webhook_status = 'pending', webhook_round = webhook_round + 1,"
                " webhook_attempts = 0, webhook_last_error = NULL, webhook_published_at = NULL,"
                " webhook_lease_until = NULL WHERE job_id = ?",
                (job_id,),
            )
        # A stage's event proves the broker had the job's first message, even if the gateway
        # that published it died before it could confirm: no one needs to publish it again
        # (nor admit it: it is in).
        db.execute(
            "UPDATE jobs SET status = ?, error = ?, pages = ?, chunks_total = ?,"
            " parsed_sha256 = ?, language = ?, updated_at = ?,"
            " confirmed_at = COALESCE(confirmed_at, ?), admitted_at = COALESCE(admitted_at, ?)"
            " WHERE job_id = ?",
            (
                state.status,
                state.error.model_dump_json() if state.error else None,
                state.pages,
                state.chunks_total,
                state.parsed_sha256,
                state.language,
                now,
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
            now = self._now()
            # A webhook not yet sent waits until the job ends again (one sent is on its way).
            db.execute(
                "UPDATE jobs SET status = ?, error = NULL, updated_at = ?, stage_since = ?,"
                " webhook_status = CASE WHEN webhook_status = 'pending'"
                " AND webhook_published_at IS NULL THEN NULL ELSE webhook_status END"
                " WHERE job_id = ?",
                (state.status, now, now, job_id),
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

    def collections(self) -> list[CollectionCounts]:
        """Every collection with a document, by name: its documents and indexed chunks."""
        # The reindexes first: one read as done is switched already, so the counts read after
        # it show the generation it built (read the other way round, they could lag).
        latest = self.latest_reindexes()
        with self._lock:
            rows = self._db.execute(_COLLECTIONS).fetchall()
        return [
            CollectionCounts(str(c), int(d), int(n), int(g), profile_of(p), latest.get(str(c)))
            for c, d, g, p, n in rows
        ]

    def claim_webhooks(self, lease_s: float, limit: int) -> list[tuple[Job, str]]:
        """Ended jobs whose webhook is due and unsent, no one holding it, oldest end first;
        each with its callback URL, leased for `lease_s` to the caller."""
        with self._tx() as db:
            claimed = lanes.claim_webhooks(db, self._clock(), lease_s, limit)
            return [
                (self._job(r), url) for i, url in claimed if (r := self._row(db, i)) is not None
            ]

    def webhook_published(self, job_id: str) -> None:
        """The broker confirmed the job's webhook request: no one needs to claim it again."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET webhook_published_at = COALESCE(webhook_published_at, ?)"
                " WHERE job_id = ? AND webhook_status IS NOT NULL",
                (self._now(), job_id),
            )

    def _take_snapshot(self) -> QueueSnapshot:
        with self._lock:
            return lanes.take_snapshot(
                self._db, self._clock(), self.pipeline, lanes=self.admission.lanes
            )

    def _job(self, row: sqlite3.Row, queue: QueueSnapshot | None = None) -> Job:
        stages = self._db.execute("SELECT * FROM job_stages WHERE job_id = ?", (row["job_id"],))
        stalled = (
            row["status"] not in TERMINAL
            and row["admitted_at"] is not None
            and row["updated_at"] < self._stalled_before()
        )
        return job_of(row, stages.fetchall(), self.pipeline, stalled=stalled, queue=queue)


def _is_live(db: sqlite3.Connection, document_id: str) -> bool:
    """Whether the document exists (was not deleted)."""
    found = db.execute("SELECT 1 FROM documents WHERE document_id = ?", (document_id,))
    return found.fetchone() is not None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
