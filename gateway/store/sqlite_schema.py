"""The SQLite job store's file: its tables, the migrations that bring a file written by an
older release up to date, and write-ahead logging. `open_database` is the one entry."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.store.base import LEGACY_KEY_OWNER

# The jobs table's columns: a new file's, and an old file's once migrated.
_JOBS_COLUMNS = """
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
    idempotency_key TEXT,
    trace_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    confirmed_at TEXT,
    lease_until TEXT,
    priority TEXT NOT NULL DEFAULT 'interactive',
    admitted_at TEXT,
    stage_since TEXT,
    callback_url TEXT,
    webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_last_error TEXT,
    webhook_round INTEGER NOT NULL DEFAULT 0,
    webhook_published_at TEXT,
    webhook_lease_until TEXT,
    key_owner TEXT,
    reindex_id TEXT,
    source_job_id TEXT,
    generation INTEGER NOT NULL DEFAULT 0
"""
# What an old file's jobs hold when the migration that adds key_owner makes the table anew:
# the columns before it. (A column added after it comes with that new table, so its own
# migration finds it there: give it a DEFAULT rather than a backfill.)
_NAMES = [line.split()[0] for line in _JOBS_COLUMNS.strip().splitlines()]
_COPIED = ", ".join(_NAMES[: _NAMES.index("key_owner")])
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS documents (
    document_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    current_job_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs ({_JOBS_COLUMNS});
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
CREATE TABLE IF NOT EXISTS collections (
    collection TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0,
    profile TEXT,
    switched_at TEXT
);
CREATE TABLE IF NOT EXISTS reindexes (
    reindex_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    generation INTEGER NOT NULL,
    from_generation INTEGER NOT NULL,
    profile TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    documents_total INTEGER NOT NULL DEFAULT 0,
    documents_done INTEGER NOT NULL DEFAULT 0,
    documents_failed INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS reindexes_one_active ON reindexes (collection)
    WHERE state IN ('running', 'switching');
CREATE TABLE IF NOT EXISTS job_units (
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    batch_count INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    PRIMARY KEY (job_id, stage, batch_index)
);
"""
# After the migrations: indexes on columns an older store gets from them (and on a jobs table
# a migration made anew). An Idempotency-Key is unique per owner and collection; a deleted
# document's jobs have theirs cleared, so the key is free again.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_bytes ON jobs (collection, blob_sha256);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC, job_id DESC);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (key_owner, collection, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
DROP INDEX IF EXISTS jobs_unconfirmed;
CREATE INDEX IF NOT EXISTS jobs_admitted_unconfirmed ON jobs (admitted_at)
    WHERE confirmed_at IS NULL AND admitted_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_held ON jobs (priority, collection, created_at)
    WHERE admitted_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_in_flight ON jobs (priority, collection)
    WHERE status NOT IN ('indexed', 'failed');
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (priority, stage_since)
    WHERE status IN ('indexed', 'failed');
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (stage_since)
    WHERE webhook_status = 'pending' AND webhook_published_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_by_document ON jobs (document_id, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_reindex ON jobs (reindex_id, document_id)
    WHERE reindex_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_source ON jobs (source_job_id)
    WHERE source_job_id IS NOT NULL;
"""

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
    (
        "jobs",
        "priority",
        (
            "ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive'",
            "ALTER TABLE jobs ADD COLUMN admitted_at TEXT",
            "ALTER TABLE jobs ADD COLUMN stage_since TEXT",
            "ALTER TABLE jobs ADD COLUMN callback_url TEXT",
            "ALTER TABLE jobs ADD COLUMN webhook_status TEXT",
            "ALTER TABLE jobs ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN webhook_last_error TEXT",
            "ALTER TABLE jobs ADD COLUMN webhook_round INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN webhook_published_at TEXT",
            "ALTER TABLE jobs ADD COLUMN webhook_lease_until TEXT",
            # Before lanes every job went into the pipeline when it was recorded.
            "UPDATE jobs SET admitted_at = created_at, stage_since = updated_at",
        ),
    ),
    (
        "jobs",
        "key_owner",
        (
            # The Idempotency-Key was unique in the whole table, and SQLite cannot drop a
            # column's constraint: the table is made anew, its rows copied (its indexes come
            # back with _INDEXES). Keys of deleted documents are free; the others had no
            # owner recorded (LEGACY_KEY_OWNER).
            f"CREATE TABLE jobs_rebuilt ({_JOBS_COLUMNS})",
            f"INSERT INTO jobs_rebuilt ({_COPIED}) SELECT {_COPIED} FROM jobs",
            "DROP TABLE jobs",
            "ALTER TABLE jobs_rebuilt RENAME TO jobs",
            "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL"
            " AND document_id NOT IN (SELECT document_id FROM documents)",
            f"UPDATE jobs SET key_owner = '{LEGACY_KEY_OWNER}' WHERE idempotency_key IS NOT NULL",
        ),
    ),
    (
        # Reindexes (gateway/store/reindex_base.py): every job before them was an upload
        # into generation 0, the collection's own index name.
        "jobs",
        "reindex_id",
        (
            "ALTER TABLE jobs ADD COLUMN reindex_id TEXT",
            "ALTER TABLE jobs ADD COLUMN source_job_id TEXT",
            "ALTER TABLE jobs ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
        ),
    ),
)


def open_database(path: Path) -> sqlite3.Connection:
    """The store's file, created or brought up to date, in WAL mode, autocommit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    # The wait first: another process may hold the file while this one sets it up.
    db.execute("PRAGMA busy_timeout=5000")
    _use_wal(db)
    # One write transaction, so two processes opening a new file at once cannot collide.
    db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
    _migrate(db)
    db.executescript(_INDEXES)
    return db


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
