"""The PostgreSQL job store's database: its tables (migrations), pooled connections that turn
trouble reaching it into `Transient`, the SQL the store's methods share, and rows as jobs.

The tables are SQLite's (jobs, documents, job_stages, job_units) with a `sluice_` prefix:
the job store may share its database with the pgvector index (`sluice_chunks`) and with
an application's own tables, where a bare `jobs` or `documents` could already exist.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from contracts.errors import Transient
from contracts.pipeline import FAILED, INDEXED, Pipeline
from gateway.http.schemas import Job
from gateway.store.base import LEGACY_KEY_OWNER
from gateway.store.job_rows import job_of
from gateway.store.queue_place import QueueSnapshot
from stages.backends.pg_schema import SchemaOnce, Step, migrate

log = logging.getLogger(__name__)
T = TypeVar("T")
Cursor = psycopg.Cursor[DictRow]
COMPONENT = "jobs"
# Deadlocks and serialization failures roll the whole transaction back: running it again is
# safe. Ordered locking makes them rare; a few attempts make them invisible.
_ATTEMPTS = 3

_VERSION_1 = """
CREATE TABLE IF NOT EXISTS sluice_documents (
    document_id text PRIMARY KEY,
    collection text NOT NULL,
    current_job_id text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sluice_documents_current ON sluice_documents (current_job_id);
CREATE TABLE IF NOT EXISTS sluice_jobs (
    job_id text PRIMARY KEY,
    document_id text NOT NULL,
    collection text NOT NULL,
    filename text NOT NULL,
    content_type text NOT NULL,
    size_bytes bigint NOT NULL,
    blob_sha256 text NOT NULL,
    parsed_sha256 text,
    status text NOT NULL,
    pages int,
    chunks_total int,
    error text,
    language text,
    idempotency_key text,
    trace_id text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    confirmed_at timestamptz,
    lease_until timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS sluice_jobs_key
    ON sluice_jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS sluice_jobs_bytes ON sluice_jobs (collection, blob_sha256);
CREATE INDEX IF NOT EXISTS sluice_jobs_document ON sluice_jobs (document_id, created_at);
CREATE INDEX IF NOT EXISTS sluice_jobs_created ON sluice_jobs (created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS sluice_jobs_unconfirmed
    ON sluice_jobs (created_at) WHERE confirmed_at IS NULL;
CREATE TABLE IF NOT EXISTS sluice_job_stages (
    job_id text NOT NULL,
    stage text NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    attempts int NOT NULL DEFAULT 0,
    units_done int NOT NULL DEFAULT 0,
    chunks int NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, stage)
);
CREATE TABLE IF NOT EXISTS sluice_job_units (
    job_id text NOT NULL,
    stage text NOT NULL,
    batch_index int NOT NULL,
    batch_count int NOT NULL,
    chunks int NOT NULL,
    PRIMARY KEY (job_id, stage, batch_index)
)
"""

# Lanes: a job's priority, its admission (held while admitted_at is NULL), when its status
# last changed (its place in its stage's line), and its webhook. Jobs from before were in
# the pipeline as soon as they were recorded.
_VERSION_2 = """
ALTER TABLE sluice_jobs
    ADD COLUMN IF NOT EXISTS priority text NOT NULL DEFAULT 'interactive',
    ADD COLUMN IF NOT EXISTS admitted_at timestamptz,
    ADD COLUMN IF NOT EXISTS stage_since timestamptz,
    ADD COLUMN IF NOT EXISTS callback_url text,
    ADD COLUMN IF NOT EXISTS webhook_status text,
    ADD COLUMN IF NOT EXISTS webhook_attempts int NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS webhook_last_error text,
    ADD COLUMN IF NOT EXISTS webhook_round int NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS webhook_published_at timestamptz,
    ADD COLUMN IF NOT EXISTS webhook_lease_until timestamptz;
UPDATE sluice_jobs SET admitted_at = created_at, stage_since = updated_at;
DROP INDEX IF EXISTS sluice_jobs_unconfirmed;
CREATE INDEX IF NOT EXISTS sluice_jobs_admitted_unconfirmed ON sluice_jobs (admitted_at)
    WHERE confirmed_at IS NULL AND admitted_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sluice_jobs_held ON sluice_jobs (priority, collection, created_at)
    WHERE admitted_at IS NULL;
CREATE INDEX IF NOT EXISTS sluice_jobs_in_flight ON sluice_jobs (priority, collection)
    WHERE status NOT IN ('indexed', 'failed');
CREATE INDEX IF NOT EXISTS sluice_jobs_ended ON sluice_jobs (priority, stage_since)
    WHERE status IN ('indexed', 'failed');
CREATE INDEX IF NOT EXISTS sluice_jobs_webhook_due ON sluice_jobs (stage_since)
    WHERE webhook_status = 'pending' AND webhook_published_at IS NULL
"""

# Idempotency-Keys belong to an owner (a fingerprint of the caller's API key) and a
# collection: unique per both, no longer in the whole table; a deleted document's jobs have
# theirs cleared, so the key is free again. Keys from before had no owner recorded.
_VERSION_3 = f"""
ALTER TABLE sluice_jobs ADD COLUMN IF NOT EXISTS key_owner text;
UPDATE sluice_jobs j SET idempotency_key = NULL WHERE j.idempotency_key IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM sluice_documents d WHERE d.document_id = j.document_id);
UPDATE sluice_jobs SET key_owner = '{LEGACY_KEY_OWNER}' WHERE idempotency_key IS NOT NULL;
DROP INDEX IF EXISTS sluice_jobs_key;
CREATE UNIQUE INDEX IF NOT EXISTS sluice_jobs_owned_key
    ON sluice_jobs (key_owner, collection, idempotency_key) WHERE idempotency_key IS NOT NULL
"""

# Reindexes (gateway/store/reindex_base.py): a collection's serving generation, its
# reindexes, and which jobs are a reindex's. Every job before was an upload into generation
# 0, the collection's own index name.
_VERSION_4 = """
ALTER TABLE sluice_jobs
    ADD COLUMN IF NOT EXISTS reindex_id text,
    ADD COLUMN IF NOT EXISTS source_job_id text,
    ADD COLUMN IF NOT EXISTS generation int NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS sluice_jobs_reindex ON sluice_jobs (reindex_id, document_id)
    WHERE reindex_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS sluice_jobs_source ON sluice_jobs (source_job_id)
    WHERE source_job_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS sluice_collections (
    collection text PRIMARY KEY,
    generation int NOT NULL DEFAULT 0,
    profile text,
    switched_at timestamptz
);
CREATE TABLE IF NOT EXISTS sluice_reindexes (
    reindex_id text PRIMARY KEY,
    collection text NOT NULL,
    generation int NOT NULL,
    from_generation int NOT NULL,
    profile text NOT NULL,
    state text NOT NULL,
    created_at timestamptz NOT NULL,
    finished_at timestamptz,
    documents_total int NOT NULL DEFAULT 0,
    documents_done int NOT NULL DEFAULT 0,
    documents_failed int NOT NULL DEFAULT 0,
    dropped int NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS sluice_reindexes_one_active ON sluice_reindexes (collection)
    WHERE state IN ('running', 'switching')
"""

# Migration n takes the schema from version n - 1 to n; append, never edit a released step.
MIGRATIONS: tuple[Step, ...] = (_VERSION_1, _VERSION_2, _VERSION_3, _VERSION_4)

# The database's clock, unless a test set one (`clock=`): then its time is sent instead.
NOW = "COALESCE(%(now)s::timestamptz, now())"
# A job's columns and whether it is stalled (admitted, not ended, quiet for too long; a
# held job waits by design); selected from `sluice_jobs j`.
JOB = (
    f"j.*, (j.status NOT IN ('{INDEXED}', '{FAILED}') AND j.admitted_at IS NOT NULL"
    f" AND j.updated_at < {NOW} - make_interval(secs => %(stalled_s)s)) AS stalled"
)
# Same bytes in a live document: the current job of a document, not failed.
LIVE_SAME_BYTES = (
    f"SELECT {JOB} FROM sluice_jobs j JOIN sluice_documents d ON d.current_job_id = j.job_id"
    f" WHERE j.blob_sha256 = %(sha)s AND j.status != '{FAILED}'"
)
# Delivered when the transaction commits, so never ahead of the data it announces.
NOTIFY = "SELECT pg_notify(%(channel)s, id) FROM unnest(%(ids)s::text[]) AS id"


class JobDatabase:
    """Pooled connections to the job store's database, its schema made on first use."""

    def __init__(self, url: str, *, max_connections: int, timeout_s: float) -> None:
        self._url = url  # for a diagnostic connection only; never in a message
        self.where = describe(url)
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        # Small: the tracker writes from one thread at a time, routes from a few.
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=timeout_s,
            # A server restart leaves dead connections in the pool: test each as it is lent.
            check=ConnectionPool.check_connection,
            configure=configure,
            name="sluice-jobs",
            open=True,
        )
        self._schema = SchemaOnce()
        try:
            self._ensure_schema()
        except Transient as exc:
            # The gateway still starts (readiness says the store is down); the schema is
            # made on first use once the database answers.
            log.warning("job store not ready yet: %s", exc)

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    def _ensure_schema(self) -> None:
        try:
            self._schema.ensure(
                lambda: self._connected(lambda conn: migrate(conn, COMPONENT, MIGRATIONS))
            )
        except psycopg.Error as exc:
            raise Transient(
                f"Could not create the job store's tables in the PostgreSQL database "
                f"{self.where} ({reason(exc)}). Check that the user SLUICE_JOB_STORE_URL "
                "names may create tables there.",
                code="job_store_unavailable",
            ) from exc

    def _connected(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work` on a pooled connection; connection trouble becomes `Transient`."""
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Transient(
                f"The job store database {self.where} did not answer within "
                f"{self._timeout_s:g} s ({self._why(exc)}). Check that PostgreSQL is running "
                "there and that SLUICE_JOB_STORE_URL names it; try again shortly.",
                code="job_store_unavailable",
            ) from exc

    def _why(self, exc: psycopg.Error) -> str:
        if not isinstance(exc, PoolTimeout):
            return reason(exc)
        # The pool only says it waited; one direct attempt says why (a refused connection,
        # a wrong password, a missing database) or that the pool is merely busy.
        try:
            psycopg.connect(self._url, connect_timeout=max(2, int(self._timeout_s))).close()
        except psycopg.Error as direct:
            return reason(direct)
        return f"all {self._max_connections} of its connections stayed busy"

    def run(self, work: Callable[[Cursor], T]) -> T:
        """`work` in one transaction (committed when it returns), tried again on a deadlock."""
        self._ensure_schema()

        def attempt(conn: psycopg.Connection[Any]) -> T:
            for n in range(1, _ATTEMPTS + 1):
                try:
                    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                        return work(cur)
                except psycopg.errors.TransactionRollback:
                    if n == _ATTEMPTS:
                        raise
            raise AssertionError("unreachable")

        return self._connected(attempt)

    def rows(self, sql: str, params: Sequence[object] | dict[str, object]) -> list[DictRow]:
        """The rows of one query."""

        def work(cur: Cursor) -> list[DictRow]:
            cur.execute(sql, params)
            return cur.fetchall()

        return self.run(work)


def with_stages(cur: Cursor, rows: dict[str, DictRow]) -> dict[str, tuple[DictRow, list[DictRow]]]:
    """Each job's row with its stages' rows, read in one query."""
    cur.execute("SELECT * FROM sluice_job_stages WHERE job_id = ANY(%s)", (list(rows),))
    stages: defaultdict[str, list[DictRow]] = defaultdict(list)
    for r in cur.fetchall():
        stages[r["job_id"]].append(r)
    return {job_id: (row, stages[job_id]) for job_id, row in rows.items()}


def jobs_of(
    cur: Cursor,
    rows: Sequence[DictRow],
    pipeline: Pipeline,
    queue: QueueSnapshot | None = None,
) -> list[Job]:
    """The API's jobs for rows selected with `JOB` (so they carry `stalled`), in order; with
    a snapshot of the queue, their places in it too."""
    found = with_stages(cur, {r["job_id"]: r for r in rows})
    return [
        job_of(row, stage_rows, pipeline, stalled=bool(row["stalled"]), queue=queue)
        for row, stage_rows in (found[r["job_id"]] for r in rows)
    ]


def configure(conn: psycopg.Connection[Any]) -> None:
    """Set up a new pooled connection: times come back in UTC, as SQLite's do."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


def describe(url: str) -> str:
    """Where the database is, for messages: name, host (or socket directory), port; never
    the password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "named by SLUICE_JOB_STORE_URL (the URL does not parse)"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{params.get('dbname') or '(default)'} on {host}{port}"


def reason(exc: psycopg.Error) -> str:
    """The server's or the driver's own words for what went wrong."""
    primary = exc.diag.message_primary if exc.diag else None
    # libpq's messages run over several lines; a log line or an API error wants one.
    return " ".join((primary or str(exc)).split()) or type(exc).__name__
