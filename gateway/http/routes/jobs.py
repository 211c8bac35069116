"""Job status, listing, the live event stream, and retry of failed jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from contracts.errors import Transient
from contracts.events import JobEvent
from gateway.http.api_responses import KEYED, EventStream, errors, event_stream, json_answer
from gateway.http.errors import ApiError
from gateway.http.schemas import Job, JobPage, JobStatus
from gateway.http.services import Access, AccessDep, ServicesDep, require_api_key
from gateway.http.uploads import RETRY_AFTER_S, publish_upload
from gateway.store.states import TERMINAL
from stages.infra import dead_letter_queue as dlq

router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(require_api_key)], responses=KEYED)
_KEEPALIVE_S = 15.0
_RECHECK_S = 2.0
# A job store that does not answer (PostgreSQL away): errors.py answers 503.
_UNAVAILABLE = "job_store_unavailable"


async def _job_or_404(services: ServicesDep, access: Access, job_id: str) -> Job:
    job = await asyncio.to_thread(services.store.get, job_id)
    # Another collection's job answers like a missing one, so keys cannot probe ids.
    if job is None or not access.allows(job.collection):
        raise ApiError(404, "job_not_found", f"No job {job_id}.")
    return job


@router.get("/{job_id}", responses=errors({404: "job_not_found", 503: _UNAVAILABLE}))
async def get_job(services: ServicesDep, access: AccessDep, job_id: str) -> Job:
    """One job's status, progress and stage timings."""
    return await _job_or_404(services, access, job_id)


@router.get(
    "",
    responses=errors(
        {
            400: ["invalid_status", "invalid_cursor"],
            403: "collection_forbidden",
            503: _UNAVAILABLE,
        }
    ),
)
async def list_jobs(
    services: ServicesDep,
    access: AccessDep,
    status: JobStatus | None = None,
    collection: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    stalled: bool | None = None,
) -> JobPage:
    """Jobs of the caller's collections, newest first, a page at a time."""
    statuses = services.settings.pipeline.statuses
    if status is not None and status not in statuses:
        raise ApiError(
            400, "invalid_status", f"Status {status[:40]!r} is not one of: {', '.join(statuses)}."
        )
    if collection:
        access.require(collection)
    try:
        jobs, next_cursor = await asyncio.to_thread(
            services.store.page,
            status,
            collection,
            limit,
            cursor,
            collections=access.collections,
            stalled=stalled,
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from exc
    return JobPage(jobs=jobs, next_cursor=next_cursor)


@router.get(
    "/{job_id}/events",
    response_class=EventStream,
    responses={
        **event_stream(
            "status",
            Job,
            "`event: status` with the job JSON at connect and on every change, `: keepalive` "
            "comments while it is quiet; the stream ends after `indexed` or `failed`.",
        ),
        **errors({404: "job_not_found", 503: _UNAVAILABLE}),
    },
)
async def job_events(
    services: ServicesDep, access: AccessDep, job_id: str, request: Request
) -> StreamingResponse:
    """Server-sent events: the job at connect and on every change, until it ends."""
    await _job_or_404(services, access, job_id)

    async def stream() -> AsyncIterator[str]:
        last = ""
        quiet_s = 0.0
        while True:
            job = await asyncio.to_thread(services.store.get, job_id)
            if job is None:
                return
            body = job.model_dump_json()
            if body != last:
                yield f"event: status\ndata: {body}\n\n"
                last, quiet_s = body, 0.0
            elif quiet_s >= _KEEPALIVE_S:
                yield ": keepalive\n\n"
                quiet_s = 0.0
            if job.status in TERMINAL or await request.is_disconnected():
                return
            started = asyncio.get_running_loop().time()
            await services.changes.wait(job_id, _RECHECK_S)
            quiet_s += asyncio.get_running_loop().time() - started

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/retry",
    status_code=202,
    responses={
        **json_answer(202, Job, "The job, reopened: it resumes from the stage that failed."),
        **errors(
            {
                404: "job_not_found",
                409: ["job_not_failed", "document_deleted", "reindex_job"],
                503: "broker_unavailable",
            }
        ),
    },
)
async def retry(services: ServicesDep, access: AccessDep, job_id: str) -> JSONResponse:
    """Resume a failed job from the stage that failed (its dead letters), else from the start."""
    job = await _job_or_404(services, access, job_id)
    if job.status != "failed" or job.error is None:
        raise ApiError(409, "job_not_failed", f"Job {job_id} is {job.status}, not failed.")
    if job.reindex_id is not None:
        # Its message names a generation its reindex may have dropped since.
        raise ApiError(
            409,
            "reindex_job",
            f"Job {job_id} is part of reindex {job.reindex_id}; start the reindex again "
            f"(POST /v1/collections/{job.collection}/reindex) rather than retry one job.",
        )
    if await asyncio.to_thread(services.store.document_collection, job.document_id) is None:
        # Its work would only be dropped (the index keeps the document's tombstone).
        raise ApiError(
            409,
            "document_deleted",
            f"Job {job_id}'s document {job.document_id} was deleted; upload the file again.",
        )
    if not services.broker.is_connected:
        raise ApiError(
            503,
            "broker_unavailable",
            "The message broker is unreachable; try again shortly.",
            RETRY_AFTER_S,
        )
    previous_error = job.error
    serving = await asyncio.to_thread(services.store.serving, job.collection)
    # Its dead letters name the generation it was sent to: once the collection switched,
    # it starts over from the upload into the generation served now.
    moved = serving.generation != job.generation
    if moved:
        await asyncio.to_thread(services.store.restamp, job_id)
    await asyncio.to_thread(services.store.reopen, job_id)
    try:
        if moved or await dlq.replay(services.broker, job_id=job_id, pipeline_only=True) == 0:
            # Its dead letters are gone (purged or replayed elsewhere): every stage is
            # idempotent, so starting over from the upload is safe.
            await publish_upload(services, job)
    except BaseException as exc:
        await asyncio.to_thread(
            services.store.apply,
            JobEvent(
                job_id=job.job_id,
                document_id=job.document_id,
                stage=previous_error.stage,
                kind="failed",
                error=previous_error,
            ),
        )
        if isinstance(exc, Transient):
            raise ApiError(
                503, "broker_unavailable", f"Replaying failed: {exc}", RETRY_AFTER_S
            ) from exc
        raise
    services.changes.notify(job_id)
    job = await _job_or_404(services, access, job_id)
    return JSONResponse(job.model_dump(mode="json"), status_code=202)
