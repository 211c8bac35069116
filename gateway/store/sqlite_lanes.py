"""The SQLite job store's queries for lanes: holding and admitting jobs fairly, the snapshot
queue places are estimated from, and claiming webhooks. Each runs on the store's connection,
inside the transaction (or under the lock) its caller holds.

Times are ISO text written by the store's clock, so they compare like the times they name.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from contracts.events import JobError
from contracts.pipeline import Pipeline
from contracts.routing import BULK, INTERACTIVE
from gateway.store.base import Admission, NewJob
from gateway.store.fair_share import Held, admission_order
from gateway.store.job_rows import as_time, waiting_of
from gateway.store.queue_place import RATE_WINDOW_S, Ended, QueueSnapshot
from gateway.store.reindex_queries import SERVING_GENERATION, SQLITE

# Admitted, not ended, and either in the pipeline for sure or still worth publishing (a job
# of a deleted document that was never confirmed will never run, and holds no slot).
IN_FLIGHT = (
    "j.admitted_at IS NOT NULL AND j.status NOT IN ('indexed', 'failed')"
    " AND (j.confirmed_at IS NOT NULL OR d.current_job_id = j.job_id)"
)
# Joins each job to its document by the primary key (`current` when it is the current version).
WITH_DOCUMENT = "FROM jobs j LEFT JOIN documents d ON d.document_id = j.document_id"


def admits_at_once(db: sqlite3.Connection, job: NewJob, policy: Admission) -> bool:
    """Whether a new job goes into the pipeline at once: always with lanes off; never for
    bulk work (it waits to be admitted fairly); interactive work unless its collection
    already has its cap in flight, or held interactive jobs that must go first."""
    if not policy.lanes:
        return True
    if job.priority == BULK:
        return False
    row = db.execute(
        "SELECT EXISTS (SELECT 1 FROM jobs j JOIN documents d"
        "  ON d.document_id = j.document_id AND d.current_job_id = j.job_id"
        "  WHERE j.admitted_at IS NULL AND j.priority = ? AND j.collection = ?) AS held,"
        f" (SELECT COUNT(*) FROM (SELECT 1 {WITH_DOCUMENT}"
        f"  WHERE j.priority = ? AND j.collection = ? AND {IN_FLIGHT} LIMIT ?)) AS in_flight",
        (
            INTERACTIVE,
            job.collection,
            INTERACTIVE,
            job.collection,
            policy.interactive_per_collection,
        ),
    ).fetchone()
    return not row["held"] and row["in_flight"] < policy.interactive_per_collection


def retire_superseded(db: sqlite3.Connection, now: datetime, error: JobError) -> int:
    """End the held jobs whose document was replaced or deleted while they waited: they will
    never be admitted, and must not look `queued` for ever. Their webhook is due like any
    ended job's. Returns how many ended."""
    at = now.isoformat()
    cur = db.execute(
        "UPDATE jobs SET status = 'failed', error = ?, updated_at = ?, stage_since = ?,"
        " webhook_status = CASE WHEN callback_url IS NULL THEN webhook_status ELSE 'pending' END,"
        " webhook_round = webhook_round + (callback_url IS NOT NULL),"
        " webhook_attempts = 0, webhook_last_error = NULL, webhook_published_at = NULL"
        " WHERE admitted_at IS NULL AND status = 'queued' AND NOT EXISTS (SELECT 1 FROM"
        " documents d WHERE d.document_id = jobs.document_id AND d.current_job_id = jobs.job_id)",
        (error.model_dump_json(), at, at),
    )
    return cur.rowcount


def claim_admissions(
    db: sqlite3.Connection, policy: Admission, now: datetime, lease_s: float, limit: int
) -> list[str]:
    """Admit the held jobs fair share picks now (see fair_share.py), each leased for
    `lease_s`; returns their ids in the order admitted."""
    in_flight = {
        (r["priority"], r["collection"]): int(r["n"])
        for r in db.execute(
            f"SELECT j.priority, j.collection, COUNT(*) AS n {WITH_DOCUMENT}"
            f" WHERE {IN_FLIGHT} GROUP BY j.priority, j.collection"
        )
    }
    bulk_room = policy.bulk_in_flight - sum(n for (lane, _), n in in_flight.items() if lane == BULK)
    # Each collection's oldest held jobs are all fair share can take from it this time.
    rows = db.execute(
        "SELECT job_id, priority, collection, created_at FROM (SELECT j.job_id, j.priority,"
        " j.collection, j.created_at, ROW_NUMBER() OVER (PARTITION BY j.priority, j.collection"
        " ORDER BY j.created_at, j.job_id) AS n FROM jobs j JOIN documents d"
        " ON d.document_id = j.document_id AND d.current_job_id = j.job_id"
        " WHERE j.admitted_at IS NULL AND (j.priority != ? OR ?)) WHERE n <= ?",
        (BULK, bulk_room > 0 or not policy.lanes, limit),
    ).fetchall()
    held = [
        Held(r["job_id"], r["priority"], r["collection"], as_time(r["created_at"]) or now)
        for r in rows
    ]
    chosen = admission_order(held, in_flight, policy, limit)
    until = (now + timedelta(seconds=lease_s)).isoformat()
    for n, job in enumerate(chosen):
        # A microsecond apart, so the order of admission is the order of their places in
        # the first stage's line (stage_since), not a tie broken by job id.
        at = (now + timedelta(microseconds=n)).isoformat()
        db.execute(
            "UPDATE jobs SET admitted_at = ?, stage_since = ?, updated_at = ?, lease_until = ?,"
            # Admitted, it builds the generation its collection serves now.
            f" generation = {SQLITE.render(SERVING_GENERATION)}"
            " WHERE job_id = ? AND admitted_at IS NULL",
            (at, at, at, until, job.job_id),
        )
    return [job.job_id for job in chosen]


def take_snapshot(
    db: sqlite3.Connection, now: datetime, pipeline: Pipeline, *, lanes: bool
) -> QueueSnapshot:
    """Every job not ended, and how many of each lane ended in the last minute."""
    waiting = db.execute(
        "SELECT j.job_id, j.priority, j.collection, j.status, j.stage_since, j.created_at,"
        " j.admitted_at IS NOT NULL AS admitted, j.confirmed_at IS NOT NULL AS confirmed,"
        f" COALESCE(d.current_job_id = j.job_id, 0) AS current {WITH_DOCUMENT}"
        " WHERE j.status NOT IN ('indexed', 'failed')"
    ).fetchall()
    since = (now - timedelta(seconds=RATE_WINDOW_S)).isoformat()
    ended = db.execute(
        "SELECT priority, COUNT(*) AS n, MIN(stage_since) AS first FROM jobs"
        " WHERE status IN ('indexed', 'failed') AND stage_since >= ? GROUP BY priority",
        (since,),
    ).fetchall()
    return QueueSnapshot(
        (waiting_of(r) for r in waiting),
        {
            str(r["priority"]): Ended(
                int(r["n"]), (now - datetime.fromisoformat(r["first"])).total_seconds()
            )
            for r in ended
        },
        pipeline=pipeline,
        lanes=lanes,
    )


def claim_webhooks(
    db: sqlite3.Connection, now: datetime, lease_s: float, limit: int
) -> list[tuple[str, str]]:
    """Ended jobs whose webhook is due and no one holds, oldest end first, each leased for
    `lease_s`; returns (job id, callback URL) pairs."""
    rows = db.execute(
        "SELECT job_id, callback_url FROM jobs"
        " WHERE webhook_status = 'pending' AND webhook_published_at IS NULL"
        " AND status IN ('indexed', 'failed') AND callback_url IS NOT NULL"
        " AND (webhook_lease_until IS NULL OR webhook_lease_until <= ?)"
        " ORDER BY stage_since, job_id LIMIT ?",
        (now.isoformat(), limit),
    ).fetchall()
    until = (now + timedelta(seconds=lease_s)).isoformat()
    db.executemany(
        "UPDATE jobs SET webhook_lease_until = ? WHERE job_id = ?",
        [(until, r["job_id"]) for r in rows],
    )
    return [(str(r["job_id"]), str(r["callback_url"])) for r in rows]
