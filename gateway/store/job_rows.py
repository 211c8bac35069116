"""What both job stores share about their rows: a job, and its state for folding, built from
its row and its stages' rows, and the opaque cursor of a page of jobs.

SQLite hands back times as ISO text and PostgreSQL as `datetime`; everything here takes
either, so the two stores answer with the same `Job` for the same history.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from contracts.events import JobError
from contracts.pipeline import Pipeline
from gateway.http.schemas import Job, Progress, StageTiming, WebhookState
from gateway.store.queue_place import QueueSnapshot, Waiting
from gateway.store.states import JobState, StageState, Webhook, stage_of_status


class Row(Protocol):
    """A row read by column name (`sqlite3.Row`, or psycopg's `dict_row`)."""

    def __getitem__(self, key: str, /) -> Any: ...


def job_of(
    row: Row,
    stage_rows: Iterable[Row],
    pipeline: Pipeline,
    *,
    stalled: bool,
    queue: QueueSnapshot | None = None,
) -> Job:
    """The API's job from a `jobs` row and its `job_stages` rows; with a snapshot of the
    queue, its place in it too."""
    names = pipeline.names
    stages = sorted(
        stage_rows,
        # Stages listed in pipeline order; one this pipeline does not know goes last.
        key=lambda r: names.index(r["stage"]) if r["stage"] in names else len(names),
    )
    counts = {r["stage"]: r["chunks"] for r in stages}
    webhook = webhook_of(row)
    job = Job(
        job_id=row["job_id"],
        document_id=row["document_id"],
        collection=row["collection"],
        filename=row["filename"],
        content_type=row["content_type"],
        size_bytes=row["size_bytes"],
        blob_sha256=row["blob_sha256"],
        status=row["status"],
        progress=Progress(
            pages=row["pages"],
            pages_read=counts.get(pipeline.first.name) or 0,
            chunks_total=row["chunks_total"],
            chunks_embedded=counts.get("embed") or 0,
            chunks_indexed=counts.get("index") or 0,
        ),
        stages={
            r["stage"]: StageTiming(
                started_at=r["started_at"], finished_at=r["finished_at"], attempts=r["attempts"]
            )
            for r in stages
        },
        error=JobError.model_validate_json(row["error"]) if row["error"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        trace_id=row["trace_id"],
        language=row["language"],
        stalled=stalled,
        stalled_in=stage_of_status(pipeline, row["status"]) if stalled else None,
        priority=row["priority"],
        admitted_at=row["admitted_at"],
        reindex_id=row["reindex_id"],
        generation=row["generation"],
        webhook=WebhookState(
            status=webhook.status,
            attempts=webhook.attempts,
            last_error=webhook.last_error,
            round=row["webhook_round"],
        )
        if webhook
        else None,
    )
    if queue is not None:
        job.queue = queue.place(job, as_time(row["stage_since"]))
    return job


def webhook_of(row: Row) -> Webhook | None:
    """A job's webhook delivery from its row (None: no callback, or the job has not ended)."""
    if row["webhook_status"] is None:
        return None
    return Webhook(row["webhook_status"], row["webhook_attempts"], row["webhook_last_error"])


def waiting_of(row: Row) -> Waiting:
    """A snapshot row (a job not ended) for the queue estimates."""
    created = as_time(row["created_at"])
    assert created is not None  # a NOT NULL column
    return Waiting(
        job_id=row["job_id"],
        priority=row["priority"],
        collection=row["collection"],
        status=row["status"],
        since=as_time(row["stage_since"]) or created,
        created_at=created,
        admitted=bool(row["admitted"]),
        current=bool(row["current"]),
        confirmed=bool(row["confirmed"]),
    )


def state_of(row: Row, stage_rows: Iterable[Row]) -> JobState:
    """What events change about a job, from its row and its stages' rows (for `states.fold`)."""
    return JobState(
        status=row["status"],
        error=JobError.model_validate_json(row["error"]) if row["error"] else None,
        pages=row["pages"],
        chunks_total=row["chunks_total"],
        parsed_sha256=row["parsed_sha256"],
        language=row["language"],
        stages={
            r["stage"]: StageState(
                started_at=as_time(r["started_at"]),
                finished_at=as_time(r["finished_at"]),
                attempts=r["attempts"],
                units_done=r["units_done"],
                chunks=r["chunks"],
            )
            for r in stage_rows
        },
    )


def as_time(value: str | datetime | None) -> datetime | None:
    """A stored time as a `datetime` (SQLite stores ISO text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


_MAX_CURSOR_CHARS = 512


def encode_cursor(created_at: str | datetime, job_id: str) -> str:
    """The cursor that continues a listing after this job."""
    when = created_at.isoformat() if isinstance(created_at, datetime) else created_at
    raw = json.dumps([when, job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    """A cursor's (created_at as ISO text, job_id); ValueError for one this API did not give."""
    try:
        # Ours are ~100 characters; a long one is garbage, and deeply nested JSON in it would
        # exhaust the parser's recursion (RecursionError) before it failed.
        if len(cursor) > _MAX_CURSOR_CHARS:
            raise ValueError("too long")
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        datetime.fromisoformat(created_at)  # garbage must not reach a query
        return str(created_at), str(job_id)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"not a cursor this API gave out: {cursor[:80]!r}") from exc
