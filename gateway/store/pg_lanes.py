"""The PostgreSQL job store's queries for lanes: holding and admitting jobs fairly, the
snapshot queue places are estimated from, and claiming webhooks. Each runs in the
transaction of its caller's cursor, with the store's parameters (`now`, `stalled_s`).

Admission is one step for every gateway at once: a transaction-scoped advisory lock of its
own keeps two admitters from counting the same free slots, and is let go at commit.
"""

from __future__ import annotations

from psycopg.rows import DictRow

from contracts.events import JobError
from contracts.pipeline import Pipeline
from contracts.routing import BULK, INTERACTIVE
from gateway.store.base import Admission, NewJob
from gateway.store.fair_share import Held, admission_order
from gateway.store.job_rows import waiting_of
from gateway.store.pg_job_db import JOB, NOW, Cursor
from gateway.store.queue_place import RATE_WINDOW_S, Ended, QueueSnapshot

# Two int4 keys: a lock space apart from the bigint keys of the schema and upload locks.
_ADMISSION_LOCK = (0x736C7563, 1)
# Admitted, not ended, and either in the pipeline for sure or still worth publishing (a job
# of a deleted document that was never confirmed will never run, and holds no slot).
IN_FLIGHT = (
    "j.admitted_at IS NOT NULL AND j.status NOT IN ('indexed', 'failed')"
    " AND (j.confirmed_at IS NOT NULL OR d.current_job_id = j.job_id)"
)
WITH_DOCUMENT = "FROM sluice_jobs j LEFT JOIN sluice_documents d ON d.document_id = j.document_id"


def admits_at_once(cur: Cursor, job: NewJob, policy: Admission, params: dict[str, object]) -> bool:
    """Whether a new job goes into the pipeline at once: always with lanes off; never for
    bulk work (it waits to be admitted fairly); interactive work unless its collection
    already has its cap in flight, or held interactive jobs that must go first.

    Checked under `create`'s lock on the upload's bytes, not one on the collection: two
    uploads at once may both get in at the cap's edge, which costs fairness nothing."""
    if not policy.lanes:
        return True
    if job.priority == BULK:
        return False
    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM sluice_jobs j JOIN sluice_documents d"
        "  ON d.document_id = j.document_id AND d.current_job_id = j.job_id"
        "  WHERE j.admitted_at IS NULL AND j.priority = %(lane)s"
        "  AND j.collection = %(collection)s) AS held,"
        f" (SELECT count(*) FROM (SELECT 1 {WITH_DOCUMENT} WHERE j.priority = %(lane)s"
        f"  AND j.collection = %(collection)s AND {IN_FLIGHT} LIMIT %(cap)s) c) AS in_flight",
        {
            **params,
            "lane": INTERACTIVE,
            "collection": job.collection,
            "cap": policy.interactive_per_collection,
        },
    )
    row = cur.fetchone()
    assert row is not None
    return not row["held"] and row["in_flight"] < policy.interactive_per_collection


def retire_superseded(cur: Cursor, error: JobError, params: dict[str, object]) -> int:
    """End the held jobs whose document was replaced or deleted while they waited: they will
    never be admitted, and must not look `queued` for ever. Their webhook is due like any
    ended job's. Returns how many ended."""
    cur.execute(
        f"UPDATE sluice_jobs j SET status = 'failed', error = %(error)s, updated_at = {NOW},"
        f" stage_since = {NOW},"
        " webhook_status = CASE WHEN callback_url IS NULL THEN webhook_status ELSE 'pending' END,"
        " webhook_round = webhook_round + (CASE WHEN callback_url IS NULL THEN 0 ELSE 1 END),"
        " webhook_attempts = 0, webhook_last_error = NULL, webhook_published_at = NULL"
        " WHERE j.admitted_at IS NULL AND j.status = 'queued' AND NOT EXISTS (SELECT 1 FROM"
        " sluice_documents d WHERE d.document_id = j.document_id"
        " AND d.current_job_id = j.job_id)",
        {**params, "error": error.model_dump_json()},
    )
    return cur.rowcount


def claim_admissions(
    cur: Cursor, policy: Admission, lease_s: float, limit: int, params: dict[str, object]
) -> list[DictRow]:
    """Admit the held jobs fair share picks now (see fair_share.py), each leased for
    `lease_s`; returns their rows (selected with `JOB`) in the order admitted."""
    cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", _ADMISSION_LOCK)
    cur.execute(
        f"SELECT j.priority, j.collection, count(*) AS n {WITH_DOCUMENT}"
        f" WHERE {IN_FLIGHT} GROUP BY j.priority, j.collection"
    )
    in_flight = {(r["priority"], r["collection"]): int(r["n"]) for r in cur.fetchall()}
    bulk_room = policy.bulk_in_flight - sum(n for (lane, _), n in in_flight.items() if lane == BULK)
    # Each collection's oldest held jobs are all fair share can take from it this time.
    cur.execute(
        "SELECT job_id, priority, collection, created_at FROM (SELECT j.job_id, j.priority,"
        " j.collection, j.created_at, row_number() OVER (PARTITION BY j.priority, j.collection"
        " ORDER BY j.created_at, j.job_id) AS n FROM sluice_jobs j JOIN sluice_documents d"
        " ON d.document_id = j.document_id AND d.current_job_id = j.job_id"
        " WHERE j.admitted_at IS NULL AND (j.priority != %(bulk)s OR %(bulk_room)s)) h"
        " WHERE n <= %(limit)s",
        {"bulk": BULK, "bulk_room": bulk_room > 0 or not policy.lanes, "limit": limit},
    )
    held = [
        Held(r["job_id"], r["priority"], r["collection"], r["created_at"]) for r in cur.fetchall()
    ]
    chosen = [h.job_id for h in admission_order(held, in_flight, policy, limit)]
    if not chosen:
        return []
    # A microsecond apart, so the order of admission is the order of their places in the
    # first stage's line (stage_since), not a tie broken by job id.
    cur.execute(
        "UPDATE sluice_jobs j SET admitted_at = t.at, stage_since = t.at, updated_at = t.at,"
        f" lease_until = {NOW} + make_interval(secs => %(lease)s),"
        # Admitted, it builds the generation its collection serves now.
        " generation = COALESCE((SELECT c.generation FROM sluice_collections c"
        " WHERE c.collection = j.collection), 0)"
        f" FROM (SELECT id, {NOW} + make_interval(secs => (n - 1) * 0.000001) AS at"
        "  FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS u(id, n)) t"
        f" WHERE j.job_id = t.id AND j.admitted_at IS NULL RETURNING {JOB}",
        {**params, "lease": lease_s, "ids": chosen},
    )
    return sorted(cur.fetchall(), key=lambda r: r["admitted_at"])


def take_snapshot(
    cur: Cursor, params: dict[str, object], pipeline: Pipeline, *, lanes: bool
) -> QueueSnapshot:
    """Every job not ended, and how many of each lane ended in the last minute."""
    cur.execute(
        "SELECT j.job_id, j.priority, j.collection, j.status, j.stage_since, j.created_at,"
        " j.admitted_at IS NOT NULL AS admitted, j.confirmed_at IS NOT NULL AS confirmed,"
        f" COALESCE(d.current_job_id = j.job_id, false) AS current {WITH_DOCUMENT}"
        " WHERE j.status NOT IN ('indexed', 'failed')"
    )
    waiting = [waiting_of(r) for r in cur.fetchall()]
    cur.execute(
        "SELECT priority, count(*) AS n,"
        f" EXTRACT(EPOCH FROM {NOW} - min(stage_since)) AS span_s"
        " FROM sluice_jobs WHERE status IN ('indexed', 'failed')"
        f" AND stage_since >= {NOW} - make_interval(secs => %(window)s) GROUP BY priority",
        {**params, "window": RATE_WINDOW_S},
    )
    ended = {str(r["priority"]): Ended(int(r["n"]), float(r["span_s"])) for r in cur.fetchall()}
    return QueueSnapshot(waiting, ended, pipeline=pipeline, lanes=lanes)


def claim_webhooks(
    cur: Cursor, lease_s: float, limit: int, params: dict[str, object]
) -> list[DictRow]:
    """Ended jobs whose webhook is due and no one holds, oldest end first, each leased for
    `lease_s` (SKIP LOCKED: one another gateway is claiming is its); rows with `JOB`."""
    cur.execute(
        f"UPDATE sluice_jobs j SET webhook_lease_until = {NOW} + make_interval(secs => %(lease)s)"
        " WHERE j.job_id IN (SELECT c.job_id FROM sluice_jobs c"
        " WHERE c.webhook_status = 'pending' AND c.webhook_published_at IS NULL"
        " AND c.status IN ('indexed', 'failed') AND c.callback_url IS NOT NULL"
        f" AND (c.webhook_lease_until IS NULL OR c.webhook_lease_until <= {NOW})"
        " ORDER BY c.stage_since, c.job_id LIMIT %(limit)s FOR UPDATE OF c SKIP LOCKED)"
        f" RETURNING {JOB}",
        {**params, "lease": lease_s, "limit": limit},
    )
    rows: list[DictRow] = cur.fetchall()
    # stage_since is set when a job is recorded, so an ended job always has one.
    return sorted(rows, key=lambda r: (r["stage_since"], r["job_id"]))
