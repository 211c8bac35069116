"""Accepting an upload: stage and check the bytes, store them, record the job, publish with
confirms — and answer 202 only once the broker has confirmed the job's first message.

Crash-safe by design: the job is recorded unconfirmed before the publish and confirmed after
it. A gateway that dies in between leaves an unconfirmed job, which any gateway's
republisher (gateway/http/republisher.py) publishes again; a client retrying the same bytes
meanwhile revives it here instead of being handed a dead job.

With lanes, the store may record a job *held* instead (bulk work, or interactive work of a
collection at its cap): it is answered 202 once recorded, and the admitter
(gateway/http/admission.py) publishes it when fair share gives it its turn.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
import uuid
from collections.abc import AsyncIterator
from pathlib import PurePath

from fastapi import UploadFile

from contracts.errors import Permanent, StorageFull, Transient
from contracts.messages import DocumentUploaded
from contracts.routing import INTERACTIVE, LANES, Lane
from gateway.http.errors import ApiError
from gateway.http.faults import fault_point
from gateway.http.idempotency import discard_refused_blob, key_reused
from gateway.http.schemas import Job, UploadAnswer
from gateway.http.services import Services
from gateway.http.staging import stream_to_staging
from gateway.store.base import OPEN_KEY_OWNER, DocumentGone, IdempotencyKeyReused, NewJob
from stages.formats import sniff
from stages.infra import tracing
from stages.infra.broker import PublishRejected, QueueUnavailable

log = logging.getLogger(__name__)
_READ_BYTES = 1 << 20
RETRY_AFTER_S = 5


def display_name(raw: str | None) -> str:
    """A client's filename, for display only: never used as a path."""
    name = PurePath((raw or "").replace("\\", "/")).name
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:255] or "upload"


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while piece := await upload.read(_READ_BYTES):
        yield piece


def answer(job: Job | NewJob, *, duplicate: bool = False) -> UploadAnswer:
    """The upload answer for a job (a job just recorded is `queued`)."""
    return UploadAnswer(
        job_id=job.job_id,
        document_id=job.document_id,
        collection=job.collection,
        filename=job.filename,
        status=job.status if isinstance(job, Job) else "queued",
        status_url=f"/v1/jobs/{job.job_id}",
        duplicate=duplicate,
    )


def valid_priority(raw: str) -> Lane:
    """An upload's `priority` field as a lane, or a 400 naming the ones there are."""
    for lane in LANES:
        if raw == lane:
            return lane
    raise ApiError(
        400,
        "invalid_priority",
        f"Priority {raw[:40]!r} is not one of: {', '.join(LANES)} (interactive: someone "
        "waits for this document; bulk: an import, admitted fairly between collections).",
    )


async def accept(
    services: Services,
    upload: UploadFile,
    collection: str,
    idempotency_key: str | None,
    document_id: str | None = None,
    *,
    priority: Lane = INTERACTIVE,
    callback_url: str | None = None,
    key_owner: str = OPEN_KEY_OWNER,
) -> tuple[int, UploadAnswer]:
    """Accept an upload (a new document, or a new version of `document_id`) in a lane, with
    the URL to POST the job to when it ends (if any); `key_owner` is whose Idempotency-Key
    it is (gateway/http/idempotency.py)."""
    filename = display_name(upload.filename)
    limit = services.settings.max_upload_bytes
    staged, sha256, size = await stream_to_staging(
        _chunks(upload), services.settings.upload_staging_dir, limit
    )
    try:
        if size > limit:
            raise ApiError(
                413, "file_too_large", f"{filename} is larger than the {limit} byte limit."
            )
        if size == 0:
            raise ApiError(400, "empty_file", f"{filename} is empty; nothing to ingest.")
        try:
            content_type = await asyncio.to_thread(sniff, staged, images=services.settings.ocr)
        except Permanent as exc:
            status = 415 if exc.code == "unsupported_media_type" else 400
            raise ApiError(status, exc.code, f"{filename}: {exc}") from exc
        # A cheap look first, so a duplicate's bytes are never stored again (an upload to S3);
        # `create` below decides for certain, atomically.
        duplicate = await asyncio.to_thread(
            _duplicate_of, services, collection, sha256, idempotency_key, document_id, key_owner
        )
        if duplicate is not None:
            return 200, answer(await _revived(services, duplicate), duplicate=True)
        await asyncio.to_thread(services.blobs.adopt, staged, sha256)
    finally:
        staged.unlink(missing_ok=True)

    job = NewJob(
        job_id=uuid.uuid4().hex,
        document_id=document_id or uuid.uuid4().hex,
        collection=collection,
        filename=filename,
        content_type=content_type,
        size_bytes=size,
        blob_sha256=sha256,
        idempotency_key=idempotency_key,
        key_owner=key_owner,
        # The upload request's trace is the job's: a person goes from a job to its trace.
        trace_id=tracing.current_trace_id(),
        replaces=document_id is not None,
        priority=priority,
        callback_url=callback_url,
    )
    # Of concurrent uploads of the same thing (one key, or the same bytes) one creates the
    # job; the store hands the others the winner's job, answered as a duplicate. A loser
    # whose key came with other bytes is refused, and its blob goes unless shared.
    try:
        existing = await asyncio.to_thread(services.store.create, job)
    except IdempotencyKeyReused as exc:
        await asyncio.to_thread(discard_refused_blob, services, sha256)
        raise key_reused(exc) from exc
    except DocumentGone as exc:
        # A new version whose document was deleted while it was uploaded.
        await asyncio.to_thread(discard_refused_blob, services, sha256)
        raise ApiError(404, exc.code, exc.message) from exc
    except StorageFull:
        raise  # its disk is full: 507, to be tried again later (gateway/http/errors.py)
    except Transient as exc:
        raise ApiError(
            503, "job_store_unavailable", f"The job store did not answer: {exc}", RETRY_AFTER_S
        ) from exc
    if existing is not None:
        return 200, answer(await _revived(services, existing), duplicate=True)
    fault_point("after_job_recorded")
    if services.settings.lanes and not await asyncio.to_thread(
        services.store.is_admitted, job.job_id
    ):
        return await _held(services, job)
    try:
        await publish_upload(services, job)
    except BaseException:
        # Refused or unconfirmed: the client is told to retry. A job another gateway has
        # claimed for republishing meanwhile stays; the retry will find it alive.
        await asyncio.to_thread(services.store.forget, job.job_id)
        raise
    try:
        await asyncio.to_thread(services.store.confirm, job.job_id)
    except Transient:
        # The broker has the job, so the answer is 202; left unconfirmed, it is only
        # published once more by a republisher, which costs work and never correctness.
        log.warning("job %s: published, but its confirmation was not recorded", job.job_id)
    # Answered from what was recorded: the store need not answer once more first.
    return 202, answer(job)


async def _held(services: Services, job: NewJob) -> tuple[int, UploadAnswer]:
    """Answer for a job recorded held: 202 now (it is durably recorded and the admitter will
    publish it), but only while there is a broker to admit it to."""
    if not services.broker.is_connected:
        await asyncio.to_thread(services.store.forget, job.job_id)
        raise ApiError(
            503,
            "broker_unavailable",
            "The message broker is unreachable; try again shortly.",
            RETRY_AFTER_S,
        )
    services.admissions.set()  # its turn may be now
    return 202, answer(job)


async def _revived(services: Services, job: Job) -> Job:
    """A duplicate's job, published again first if its gateway died before the broker
    confirmed it: the client who retries gets a job that will move, not a dead one. A held
    job is not dead: it waits for its turn."""
    if job.admitted_at is None:
        return job
    if await asyncio.to_thread(services.store.is_confirmed, job.job_id):
        return job
    await publish_upload(services, job)
    await asyncio.to_thread(services.store.confirm, job.job_id)
    return job


def _duplicate_of(
    services: Services,
    collection: str,
    sha256: str,
    idempotency_key: str | None,
    document_id: str | None,
    key_owner: str,
) -> Job | None:
    if document_id is None:
        try:
            return services.store.find_duplicate(
                collection, sha256, idempotency_key, key_owner=key_owner
            )
        except IdempotencyKeyReused as exc:
            raise key_reused(exc) from exc
    current = services.store.current_job(document_id)
    same = current is not None and current.blob_sha256 == sha256 and current.status != "failed"
    return current if same else None


async def publish_upload(services: Services, job: NewJob | Job) -> None:
    """Publish a job's `doc.uploaded`, turning broker trouble into 429/503 answers."""
    if not services.broker.is_connected:
        raise ApiError(
            503,
            "broker_unavailable",
            "The message broker is unreachable; try again shortly.",
            RETRY_AFTER_S,
        )
    # The generation of the collection's index it builds, and how (gateway/store/
    # reindex_base.py): the serving one when the job was recorded or admitted.
    try:
        target = await asyncio.to_thread(services.store.index_target, job.job_id)
    except Transient as exc:
        raise ApiError(
            503, "job_store_unavailable", f"The job store did not answer: {exc}", RETRY_AFTER_S
        ) from exc
    message = DocumentUploaded(
        job_id=job.job_id,
        document_id=job.document_id,
        collection=job.collection,
        filename=job.filename,
        blob_sha256=job.blob_sha256,
        content_type=job.content_type,
        size_bytes=job.size_bytes,
        priority=job.priority,
        generation=target.generation,
        profile=target.profile,
    )
    try:
        await services.broker.publish(message, services.settings.pipeline.first.input_key)
    except QueueUnavailable as exc:
        # Not full, only between leaders: a node of the RabbitMQ cluster was just lost.
        raise ApiError(
            503,
            "broker_unavailable",
            f"The message broker did not take the upload: {exc}",
            RETRY_AFTER_S,
        ) from exc
    except PublishRejected as exc:
        raise ApiError(
            429, "pipeline_saturated", "The pipeline is full; try again shortly.", RETRY_AFTER_S
        ) from exc
    except Transient as exc:
        raise ApiError(
            503,
            "broker_unavailable",
            f"The message broker did not confirm the upload: {exc}",
            RETRY_AFTER_S,
        ) from exc


async def publish_and_confirm(services: Services, job: Job, why: str) -> bool:
    """Publish a recorded job's `doc.uploaded` and confirm it; returns whether it went out.
    A refusal is logged and left: the job stays unconfirmed, and a later round (the
    republisher's, once its lease runs out) sends it. `why` says in the log who sent it."""
    try:
        await publish_upload(services, job)
    except ApiError as exc:
        log.warning("job %s: %s, but not published yet (%s)", job.job_id, why, exc)
        return False
    await asyncio.to_thread(services.store.confirm, job.job_id)
    return True
