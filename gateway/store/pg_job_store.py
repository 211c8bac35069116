"""The job store in PostgreSQL, for any number of gateways sharing one database.

The same tables and behaviour as the SQLite store, held to the same contract tests; what
changes is how writers on several hosts are kept apart:

- folding locks the jobs' rows (`SELECT … FOR UPDATE`, in job id order so two batches never
  deadlock) before reading their state, and job_units' primary key decides whether a unit
  is new: trackers on several gateways folding events of one job at once count each unit
  once and never overwrite each other's progress;
- `create` checks for a duplicate and inserts under advisory locks on the owner's key in
  the collection and on (collection, bytes), with a unique index on the key as the backstop;
- `claim_unconfirmed` and `claim_webhooks` lease with `FOR UPDATE SKIP LOCKED`, so no two
  gateways claim a job; `claim_admissions` counts free slots under an advisory lock of its
  own (gateway/store/pg_lanes.py), so two admitters never fill the same slot;
- a change a client may be following sends `pg_notify` in the transaction that made it, so
  a notification is never ahead of the data (gateway/store/changes.py listens).

Times come from the database's clock (`now()`), one clock for every gateway. Calls block on
the network: the gateway makes them from worker threads, never on its event loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime

from psycopg.rows import DictRow

from contracts.errors import Transient
from contracts.events import JobEvent
from contracts.pipeline import Pipeline, default_pipeline
from gateway.http.schemas import Job
from gateway.store import pg_lanes as lanes
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
from gateway.store.changes import CHANNEL
from gateway.store.job_rows import decode_cursor, encode_cursor, state_of, webhook_of
from gateway.store.pg_job_db import (
    JOB,
    LIVE_SAME_BYTES,
    NOTIFY,
    NOW,
    Cursor,
    JobDatabase,
    jobs_of,
    with_stages,
)
from gateway.store.pg_reindex import PgReindexes
from gateway.store.queue_place import QueueSnapshot, QueueSnapshots
from gateway.store.reindex_queries import profile_of
from gateway.store.states import JobState, Webhook


class PgJobStore(PgReindexes):
    """The job store in one PostgreSQL database, shared by every gateway."""

    def __init__(
        self,
        url: str,
        *,
        pipeline: Pipeline | None = None,
        stalled_after_s: float = 600.0,
        clock: Callable[[], datetime] | None = None,
        max_connections: int = 8,
        timeout_s: float = 5.0,
        admission: Admission | None = None,
        queue_max_age_s: float = 1.0,
    ) -> None:
        self.pipeline = pipeline or default_pipeline()
        self.stalled_after_s = stalled_after_s
        self.admission = admission or Admission()
        self._clock = clock
        self._db = JobDatabase(url, max_connections=max_connections, timeout_s=timeout_s)
        self._queue = QueueSnapshots(self._take_snapshot, queue_max_age_s)

    def close(self) -> None:
        """Close the pool's connections."""
        self._db.close()

    def _params(self, **values: object) -> dict[str, object]:
        return {
            "now": self._clock() if self._clock else None,
            "stalled_s": self.stalled_after_s,
            **values,
        }

    def _jobs(self, joins_and_where: str, **values: object) -> list[Job]:
        """The jobs `SELECT … FROM sluice_jobs j {joins_and_where}` finds, placed in the queue."""
        queue = self._queue.current()

        def work(cur: Cursor) -> list[Job]:
            sql = f"SELECT {JOB} FROM sluice_jobs j {joins_and_where}"
            cur.execute(sql, self._params(**values))
            return jobs_of(cur, cur.fetchall(), self.pipeline, queue)

        return self._db.run(work)

    def create(self, job: NewJob) -> Job | None:
        """Record an unconfirmed job, unless a duplicate exists: then return it, writing nothing
        (`IdempotencyKeyReused` for its key with other bytes)."""

        def work(cur: Cursor) -> Job | None:
            # Why not a unique constraint: "same bytes in a live document" spans two tables
            # (the document's *current* job) and changes with state — a failed job, a
            # deleted document or a replaced version stops counting, while its row stays as
            # history. A unique index covers columns of one table under a fixed predicate,
            # so it would forbid uploading those bytes again. Instead, uploads of the same
            # bytes to a collection take turns, and so do uploads with one owner's key in a
            # collection, whatever their bytes: these locks hold from the check below to the
            # commit of the insert, on every gateway. Always the key's first, so two uploads
            # never wait for each other's.
            if job.idempotency_key:
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"key:{job.key_owner}:{job.collection}:{job.idempotency_key}",),
                )
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"{job.collection}:{job.blob_sha256}",),
            )
            if job.replaces:
                # Locked until the commit: a delete of the document waits for this version
                # (and then ends it), or this finds the document gone.
                cur.execute(
                    "SELECT 1 FROM sluice_documents WHERE document_id = %s FOR UPDATE",
                    (job.document_id,),
                )
                if cur.fetchone() is None:
                    raise DocumentGone(job.document_id)
            duplicate = self._duplicate(cur, job)
            if duplicate is not None:
                return jobs_of(cur, [duplicate], self.pipeline)[0]
            # No conflict target: the key's unique index is only the backstop. Should a
            # writer with the key still have committed first, this insert waits for it, then
            # writes nothing, and the check, run again, answers with its job.
            admitted = lanes.admits_at_once(cur, job, self.admission, self._params())
            cur.execute(
                "INSERT INTO sluice_jobs (job_id, document_id, collection, filename,"
                " content_type, size_bytes, blob_sha256, status, idempotency_key, key_owner,"
                " trace_id, created_at, updated_at, priority, callback_url, admitted_at,"
                " stage_since, generation) VALUES (%(job_id)s, %(document_id)s,"
                " %(collection)s, %(filename)s, %(content_type)s, %(size_bytes)s, %(sha)s,"
                f" 'queued', %(key)s, %(owner)s, %(trace_id)s, {NOW}, {NOW}, %(priority)s,"
                f" %(callback_url)s, CASE WHEN %(admitted)s THEN {NOW} END, {NOW},"
                # The generation its messages build: the collection's serving one.
                " COALESCE((SELECT c.generation FROM sluice_collections c"
                " WHERE c.collection = %(collection)s), 0))"
                " ON CONFLICT DO NOTHING RETURNING job_id",
                {**self._new_job_params(job), "admitted": admitted},
            )
            if cur.fetchone() is None:
                winner = self._duplicate(cur, job) or self._by_id(cur, job.job_id)
                if winner is None:  # the winner was forgotten (its publish refused) just now
                    raise Transient(
                        "An upload with the same Idempotency-Key was recorded and withdrawn "
                        "at the same moment; send it again.",
                        code="job_store_conflict",
                    )
                return jobs_of(cur, [winner], self.pipeline)[0]
            cur.execute(
                "INSERT INTO sluice_documents (document_id, collection, current_job_id,"
                f" created_at) VALUES (%(document_id)s, %(collection)s, %(job_id)s, {NOW})"
                " ON CONFLICT (document_id) DO UPDATE SET current_job_id = EXCLUDED.current_job_id",
                self._new_job_params(job),
            )
            return None

        return self._db.run(work)

    def _new_job_params(self, job: NewJob) -> dict[str, object]:
        return self._params(
            job_id=job.job_id,
            document_id=job.document_id,
            collection=job.collection,
            filename=job.filename,
            content_type=job.content_type,
            size_bytes=job.size_bytes,
            sha=job.blob_sha256,
            key=job.idempotency_key or None,
            owner=job.key_owner if job.idempotency_key else None,
            trace_id=job.trace_id,
            priority=job.priority,
            callback_url=job.callback_url,
        )

    def _duplicate(self, cur: Cursor, job: NewJob) -> DictRow | None:
        row = self._by_key(cur, job)
        if row is not None:
            if row["blob_sha256"] != job.blob_sha256:
                raise IdempotencyKeyReused(job.idempotency_key or "", row["job_id"])
            return row
        if job.replaces:
            # A new version repeats only its own document's current bytes.
            sql = f"{LIVE_SAME_BYTES} AND d.document_id = %(document_id)s"
        else:
            sql = f"{LIVE_SAME_BYTES} AND j.collection = %(collection)s ORDER BY j.created_at"
        cur.execute(f"{sql} LIMIT 1", self._new_job_params(job))
        return cur.fetchone()

    def _by_key(self, cur: Cursor, job: NewJob) -> DictRow | None:
        """The first job of the owner's key in the collection (a legacy key, of no recorded
        owner, answers anyone there)."""
        if not job.idempotency_key:
            return None
        cur.execute(
            f"SELECT {JOB} FROM sluice_jobs j WHERE j.collection = %(collection)s"
            " AND j.idempotency_key = %(key)s AND j.key_owner IN (%(owner)s, %(legacy)s)"
            " ORDER BY j.created_at LIMIT 1",
            {**self._new_job_params(job), "legacy": LEGACY_KEY_OWNER},
        )
        return cur.fetchone()

    def _by_id(self, cur: Cursor, job_id: str, *, lock: bool = False) -> DictRow | None:
        cur.execute(
            f"SELECT {JOB} FROM sluice_jobs j WHERE j.job_id = %(job_id)s"
            + (" FOR UPDATE" if lock else ""),
            self._params(job_id=job_id),
        )
        return cur.fetchone()

    def confirm(self, job_id: str) -> None:
        """The broker confirmed the job's first message: it is in the pipeline."""
        self._db.run(
            lambda cur: cur.execute(
                f"UPDATE sluice_jobs SET confirmed_at = COALESCE(confirmed_at, {NOW})"
                " WHERE job_id = %(job_id)s",
                self._params(job_id=job_id),
            )
        )

    def is_confirmed(self, job_id: str) -> bool:
        """Whether the job's first message was confirmed (False for an unknown job)."""
        sql = "SELECT 1 FROM sluice_jobs WHERE job_id = %s AND confirmed_at IS NOT NULL"
        return bool(self._db.rows(sql, (job_id,)))

    def is_admitted(self, job_id: str) -> bool:
        """Whether the job was let into the pipeline (False while held, or unknown)."""
        sql = "SELECT 1 FROM sluice_jobs WHERE job_id = %s AND admitted_at IS NOT NULL"
        return bool(self._db.rows(sql, (job_id,)))

    def claim_admissions(self, lease_s: float, limit: int) -> list[Job]:
        """Admit the held jobs fair share picks now, each leased for `lease_s`, in order."""

        def work(cur: Cursor) -> list[Job]:
            lanes.retire_superseded(cur, states.superseded(self.pipeline), self._params())
            rows = lanes.claim_admissions(cur, self.admission, lease_s, limit, self._params())
            return jobs_of(cur, rows, self.pipeline)

        return self._db.run(work)

    def claim_unconfirmed(self, older_than_s: float, lease_s: float, limit: int) -> list[Job]:
        """Jobs admitted long ago and never confirmed that no one holds, each leased for
        `lease_s` to the caller."""

        def work(cur: Cursor) -> list[Job]:
            # SKIP LOCKED: a job another gateway is claiming right now is its, not ours.
            # Only a document's current version: a deleted or replaced one is not worth
            # publishing (it would bring a deleted document back into the index). Held jobs
            # (admitted_at NULL) wait for the admitter, not for this.
            cur.execute(
                f"UPDATE sluice_jobs j SET lease_until = {NOW} + make_interval(secs => %(lease)s)"
                " WHERE j.job_id IN (SELECT c.job_id FROM sluice_jobs c"
                " JOIN sluice_documents d ON d.current_job_id = c.job_id"
                f" WHERE c.confirmed_at IS NULL AND c.admitted_at < {NOW}"
                " - make_interval(secs => %(older)s)"
                f" AND (c.lease_until IS NULL OR c.lease_until <= {NOW})"
                " ORDER BY c.admitted_at LIMIT %(limit)s FOR UPDATE OF c SKIP LOCKED)"
                f" RETURNING {JOB}",
                self._params(lease=lease_s, older=older_than_s, limit=limit),
            )
            rows = sorted(cur.fetchall(), key=lambda r: r["admitted_at"])
            return jobs_of(cur, rows, self.pipeline)

        return self._db.run(work)

    def forget(self, job_id: str) -> bool:
        """Remove an unconfirmed, never claimed job, and its document if it had no other job."""

        def work(cur: Cursor) -> bool:
            row = self._by_id(cur, job_id, lock=True)
            if row is None or row["confirmed_at"] is not None or row["lease_until"] is not None:
                return False
            for table in ("sluice_job_units", "sluice_job_stages", "sluice_jobs"):
                cur.execute(f"DELETE FROM {table} WHERE job_id = %s", (job_id,))
            # If it was its document's current version, the one before is current again; a
            # document with no other job goes. (Deleted meanwhile, or replaced by a newer
            # version: the document is left as it is.)
            ids = {"document_id": row["document_id"], "job_id": job_id}
            cur.execute(
                "UPDATE sluice_documents d SET current_job_id = p.job_id FROM"
                " (SELECT job_id FROM sluice_jobs WHERE document_id = %(document_id)s"
                "  ORDER BY created_at DESC LIMIT 1) p"
                " WHERE d.document_id = %(document_id)s AND d.current_job_id = %(job_id)s",
                ids,
            )
            cur.execute(
                "DELETE FROM sluice_documents"
                " WHERE document_id = %(document_id)s AND current_job_id = %(job_id)s",
                ids,
            )
            # Streams following it on other gateways learn that it is gone.
            cur.execute(NOTIFY, {"channel": CHANNEL, "ids": [job_id]})
            return True

        return self._db.run(work)

    def get(self, job_id: str) -> Job | None:
        """One job with its progress, stage timings and place in the queue."""
        return next(iter(self._jobs("WHERE j.job_id = %(job_id)s", job_id=job_id)), None)

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
        """Jobs newest first, filtered, a page at a time; the cursor is opaque to clients."""
        where = ["TRUE"]
        params = self._params(limit=limit + 1)
        if status:
            where.append("j.status = %(status)s")
            params["status"] = status
        if collection:
            where.append("j.collection = %(collection)s")
            params["collection"] = collection
        if collections is not None:
            where.append("j.collection = ANY(%(collections)s)")
            params["collections"] = sorted(collections)
        if cursor:
            params["after_at"], params["after_id"] = decode_cursor(cursor)
            where.append("(j.created_at, j.job_id) < (%(after_at)s::timestamptz, %(after_id)s)")
        sql = f"SELECT * FROM (SELECT {JOB} FROM sluice_jobs j WHERE {' AND '.join(where)}) j"
        if stalled is not None:
            sql += " WHERE " + ("j.stalled" if stalled else "NOT j.stalled")
        sql += " ORDER BY j.created_at DESC, j.job_id DESC LIMIT %(limit)s"
        queue = self._queue.current()

        def work(cur: Cursor) -> tuple[list[Job], str | None]:
            cur.execute(sql, params)
            rows = cur.fetchall()
            jobs = jobs_of(cur, rows[:limit], self.pipeline, queue)
            last = rows[limit - 1] if len(rows) > limit and limit else None
            return jobs, encode_cursor(last["created_at"], last["job_id"]) if last else None

        return self._db.run(work)

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

        def work(cur: Cursor) -> Job | None:
            row = self._duplicate(cur, probe)
            return jobs_of(cur, [row], self.pipeline)[0] if row else None

        return self._db.run(work)

    def collections_of(self, job_ids: Collection[str]) -> dict[str, str]:
        """The collection of each known job among `job_ids`."""
        if not job_ids:
            return {}
        sql = "SELECT job_id, collection FROM sluice_jobs WHERE job_id = ANY(%s)"
        return {r["job_id"]: r["collection"] for r in self._db.rows(sql, (sorted(set(job_ids)),))}

    def document_collection(self, document_id: str) -> str | None:
        """The collection of a live document, or None if there is no such document."""
        sql = "SELECT collection FROM sluice_documents WHERE document_id = %s"
        rows = self._db.rows(sql, (document_id,))
        return str(rows[0]["collection"]) if rows else None

    def current_job(self, document_id: str) -> Job | None:
        """The job of a document's current version."""
        found = self._jobs(
            "JOIN sluice_documents d ON d.current_job_id = j.job_id"
            " WHERE d.document_id = %(document_id)s",
            document_id=document_id,
        )
        return found[0] if found else None

    def delete_document(self, document_id: str) -> list[JobBlobs]:
        """Forget a document (its jobs stay as history) and free its jobs' Idempotency-Keys;
        returns the blobs its jobs wrote."""

        def work(cur: Cursor) -> list[JobBlobs]:
            cur.execute("DELETE FROM sluice_documents WHERE document_id = %s", (document_id,))
            cur.execute(
                "UPDATE sluice_jobs SET idempotency_key = NULL, key_owner = NULL"
                " WHERE document_id = %s AND idempotency_key IS NOT NULL",
                (document_id,),
            )
            cur.execute(
                "SELECT job_id, blob_sha256, parsed_sha256 FROM sluice_jobs WHERE document_id = %s",
                (document_id,),
            )
            return [
                JobBlobs(r["blob_sha256"], r["parsed_sha256"], r["job_id"]) for r in cur.fetchall()
            ]

        return self._db.run(work)

    def recorded_collection(self, document_id: str) -> str | None:
        """The collection of a live document, or of a deleted one by its jobs' history."""
        sql = (
            "SELECT collection FROM sluice_documents WHERE document_id = %(id)s"
            " UNION ALL SELECT collection FROM sluice_jobs WHERE document_id = %(id)s LIMIT 1"
        )
        rows = self._db.rows(sql, {"id": document_id})
        return str(rows[0]["collection"]) if rows else None

    def end_deleted_jobs(self, document_id: str) -> list[str]:
        """End the unended jobs of a deleted document (`document_deleted`); their ids."""

        def work(cur: Cursor) -> list[str]:
            # Locked in job id order, as folding locks them: a tracker folding one of these
            # jobs at once waits, or is waited for, and never deadlocks with this.
            cur.execute(
                "SELECT job_id, status FROM sluice_jobs WHERE document_id = %(id)s"
                " AND status NOT IN ('indexed', 'failed') AND NOT EXISTS"
                " (SELECT 1 FROM sluice_documents WHERE document_id = %(id)s)"
                " ORDER BY job_id FOR UPDATE",
                {"id": document_id},
            )
            rows = cur.fetchall()
            for row in rows:
                error = states.document_deleted(self.pipeline, row["status"])
                # Its webhook is due like any ended job's (as `retire_superseded` does).
                cur.execute(
                    f"UPDATE sluice_jobs SET status = 'failed', error = %(error)s,"
                    f" updated_at = {NOW}, stage_since = {NOW}, webhook_status = CASE"
                    " WHEN callback_url IS NULL THEN webhook_status ELSE 'pending' END,"
                    " webhook_round = webhook_round"
                    " + (CASE WHEN callback_url IS NULL THEN 0 ELSE 1 END),"
                    " webhook_attempts = 0, webhook_last_error = NULL,"
                    " webhook_published_at = NULL, webhook_lease_until = NULL"
                    " WHERE job_id = %(job_id)s",
                    self._params(error=error.model_dump_json(), job_id=row["job_id"]),
                )
            ended = [str(row["job_id"]) for row in rows]
            if ended:
                # Streams following them on other gateways learn that they ended.
                cur.execute(NOTIFY, {"channel": CHANNEL, "ids": ended})
            return ended

        return self._db.run(work)

    def blob_in_use(self, sha256: str) -> bool:
        """Whether a live document's job still needs this blob (blobs are shared by content)."""
        sql = (
            "SELECT 1 FROM sluice_jobs j JOIN sluice_documents d ON d.document_id = j.document_id"
            " WHERE j.blob_sha256 = %(sha)s OR j.parsed_sha256 = %(sha)s LIMIT 1"
        )
        return bool(self._db.rows(sql, {"sha": sha256}))

    def apply(self, event: JobEvent) -> bool:
        """Fold one event into its job; returns whether anything changed."""
        return bool(self.apply_all([event]))

    def apply_all(self, events: Sequence[JobEvent]) -> set[str]:
        """Fold events into their jobs in one transaction; returns the ids of the jobs that
        changed (each notified on the change feed when the transaction commits)."""
        if not events:
            return set()

        def work(cur: Cursor) -> set[str]:
            # Locked before their state is read, so a fold on another gateway waits for this
            # one and then reads what it wrote; in id order, so two batches cannot deadlock.
            cur.execute(
                "SELECT * FROM sluice_jobs WHERE job_id = ANY(%s) ORDER BY job_id FOR UPDATE",
                (sorted({e.job_id for e in events}),),
            )
            rows = {r["job_id"]: r for r in cur.fetchall()}
            state = {i: state_of(r, s) for i, (r, s) in with_stages(cur, rows).items()}
            before = dict(state)
            webhook = {i: webhook_of(r) for i, r in rows.items()}
            touched: defaultdict[str, set[str]] = defaultdict(set)
            hooked: set[str] = set()
            new_round: set[str] = set()
            for event in events:
                job_id = event.job_id
                if job_id not in state:
                    continue
                if states.is_side(self.pipeline, event):
                    # The webhook stage's events touch only the job's webhook.
                    after = states.webhook_after(webhook[job_id], event)
                    if after != webhook[job_id]:
                        webhook[job_id] = after
                        hooked.add(job_id)
                    continue
                new_unit = event.kind == "progress" and self._new_unit(cur, event)
                prior = state[job_id]
                state[job_id] = states.fold(prior, event, new_unit=new_unit, pipeline=self.pipeline)
                touched[job_id].add(event.stage)
                if states.ended(prior, state[job_id]) and rows[job_id]["callback_url"]:
                    # Its webhook is due: a new round, so a job that ends again is told again.
                    webhook[job_id] = Webhook("pending")
                    new_round.add(job_id)
                    hooked.add(job_id)
            for job_id, stages in touched.items():
                self._save(cur, job_id, before[job_id], state[job_id], stages)
            for job_id in sorted(hooked):
                self._save_webhook(cur, job_id, webhook[job_id], new_round=job_id in new_round)
            changed = set(touched) | hooked
            if changed:
                cur.execute(NOTIFY, {"channel": CHANNEL, "ids": sorted(changed)})
            return changed

        return self._db.run(work)

    def _new_unit(self, cur: Cursor, event: JobEvent) -> bool:
        # The unit's primary key decides whether it counts: a redelivered event adds nothing.
        cur.execute(
            "INSERT INTO sluice_job_units (job_id, stage, batch_index, batch_count, chunks)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (event.job_id, event.stage, event.batch_index, event.batch_count, event.chunks),
        )
        return cur.rowcount == 1

    def _save(
        self,
        cur: Cursor,
        job_id: str,
        before: JobState,
        state: JobState,
        stages: Iterable[str],
    ) -> None:
        # A stage's event proves the broker had the job's first message, even if the gateway
        # that published it died before it could confirm: no one needs to publish it again
        # (nor admit it: it is in).
        cur.execute(
            "UPDATE sluice_jobs SET status = %(status)s, error = %(error)s, pages = %(pages)s,"
            " chunks_total = %(chunks_total)s, parsed_sha256 = %(parsed)s,"
            f" language = %(language)s, updated_at = {NOW},"
            f" stage_since = CASE WHEN %(moved)s THEN {NOW} ELSE stage_since END,"
            f" confirmed_at = COALESCE(confirmed_at, {NOW}),"
            f" admitted_at = COALESCE(admitted_at, {NOW}) WHERE job_id = %(job_id)s",
            self._params(
                moved=state.status != before.status,
                status=state.status,
                error=state.error.model_dump_json() if state.error else None,
                pages=state.pages,
                chunks_total=state.chunks_total,
                parsed=state.parsed_sha256,
                language=state.language,
                job_id=job_id,
            ),
        )
        cur.executemany(
            "INSERT INTO sluice_job_stages"
            " (job_id, stage, started_at, finished_at, attempts, units_done, chunks)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (job_id, stage) DO UPDATE SET"
            " started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,"
            " attempts = EXCLUDED.attempts, units_done = EXCLUDED.units_done,"
            " chunks = EXCLUDED.chunks",
            [
                (job_id, name, s.started_at, s.finished_at, s.attempts, s.units_done, s.chunks)
                for name in sorted(stages)
                for s in (state.stages[name],)
            ],
        )

    def _save_webhook(
        self, cur: Cursor, job_id: str, webhook: Webhook | None, *, new_round: bool
    ) -> None:
        if webhook is None:
            return
        cur.execute(
            "UPDATE sluice_jobs SET webhook_status = %(status)s, webhook_attempts = %(attempts)s,"
            " webhook_last_error = %(error)s"
            + (
                ", webhook_round = webhook_round + 1, webhook_published_at = NULL,"
                " webhook_lease_until = NULL"
                if new_round
                else ""
            )
            + " WHERE job_id = %(job_id)s",
            {
                "status": webhook.status,
                "attempts": webhook.attempts,
                "error": webhook.last_error,
                "job_id": job_id,
            },
        )

    def reopen(self, job_id: str) -> Job | None:
        """Put a failed job back in flight at the stage that failed (for a retry)."""

        def reopen(cur: Cursor) -> bool:
            row = self._by_id(cur, job_id, lock=True)
            if row is None:
                return False
            row_, stage_rows = with_stages(cur, {job_id: row})[job_id]
            state = states.reopened(state_of(row_, stage_rows), self.pipeline)
            if state is None:
                return False
            # A webhook not yet sent waits until the job ends again (one sent is on its way).
            cur.execute(
                f"UPDATE sluice_jobs SET status = %(status)s, error = NULL, updated_at = {NOW},"
                f" stage_since = {NOW}, webhook_status = CASE WHEN webhook_status = 'pending'"
                " AND webhook_published_at IS NULL THEN NULL ELSE webhook_status END"
                " WHERE job_id = %(job_id)s",
                self._params(status=state.status, job_id=job_id),
            )
            cur.execute(NOTIFY, {"channel": CHANNEL, "ids": [job_id]})
            return True

        return self.get(job_id) if self._db.run(reopen) else None

    def ping(self) -> None:
        """Raise (`Transient`, code `job_store_unavailable`) if the store cannot be read."""
        self._db.run(lambda cur: cur.execute("SELECT 1 FROM sluice_jobs LIMIT 1"))

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status."""
        sql = "SELECT status, count(*) AS n FROM sluice_jobs GROUP BY status"
        return {str(r["status"]): int(r["n"]) for r in self._db.rows(sql, ())}

    def collections(self) -> list[CollectionCounts]:
        """Every collection with a document, by name: its documents and indexed chunks."""
        # The reindexes first: one read as done is switched already, so the counts read after
        # it show the generation it built (read the other way round, they could lag).
        latest = self.latest_reindexes()
        # Chunks of the serving generation: each document's newest job there, if indexed.
        sql = (
            "SELECT d.collection, count(*) AS documents,"
            " COALESCE(max(c.generation), 0) AS generation, max(c.profile) AS profile,"
            " COALESCE(sum(CASE WHEN k.status = 'indexed' THEN k.chunks_total END), 0) AS chunks"
            " FROM sluice_documents d LEFT JOIN sluice_collections c"
            " ON c.collection = d.collection LEFT JOIN sluice_jobs k ON k.job_id ="
            " (SELECT v.job_id FROM sluice_jobs v WHERE v.document_id = d.document_id"
            "  AND v.generation = COALESCE(c.generation, 0)"
            "  ORDER BY v.created_at DESC, v.job_id DESC LIMIT 1)"
            " GROUP BY d.collection ORDER BY d.collection"
        )
        return [
            CollectionCounts(
                str(r["collection"]),
                int(r["documents"]),
                int(r["chunks"]),
                int(r["generation"]),
                profile_of(r["profile"]),
                latest.get(str(r["collection"])),
            )
            for r in self._db.rows(sql, ())
        ]

    def claim_webhooks(self, lease_s: float, limit: int) -> list[tuple[Job, str]]:
        """Ended jobs whose webhook is due and unsent, no one holding it, oldest end first;
        each with its callback URL, leased for `lease_s` to the caller."""

        def work(cur: Cursor) -> list[tuple[Job, str]]:
            rows = lanes.claim_webhooks(cur, lease_s, limit, self._params())
            urls = [str(r["callback_url"]) for r in rows]
            return list(zip(jobs_of(cur, rows, self.pipeline), urls, strict=True))

        return self._db.run(work)

    def webhook_published(self, job_id: str) -> None:
        """The broker confirmed the job's webhook request: no one needs to claim it again."""
        self._db.run(
            lambda cur: cur.execute(
                "UPDATE sluice_jobs SET webhook_published_at ="
                f" COALESCE(webhook_published_at, {NOW})"
                " WHERE job_id = %(job_id)s AND webhook_status IS NOT NULL",
                self._params(job_id=job_id),
            )
        )

    def _take_snapshot(self) -> QueueSnapshot:
        return self._db.run(
            lambda cur: lanes.take_snapshot(
                cur, self._params(), self.pipeline, lanes=self.admission.lanes
            )
        )
