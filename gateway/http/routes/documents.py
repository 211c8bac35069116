"""Uploads, new versions, and deletion of documents."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Response, UploadFile
from fastapi.responses import JSONResponse

from contracts.generations import index_name
from contracts.messages import COLLECTION_PATTERN, SHA256_PATTERN
from gateway.http import gateway_metrics as metrics
from gateway.http.api_responses import KEYED, UPLOAD_ANSWERS, errors
from gateway.http.callbacks import ApiKeyDep, resolve_callback_url
from gateway.http.errors import ApiError
from gateway.http.idempotency import key_owner, valid_idempotency_key
from gateway.http.services import Access, AccessDep, Services, ServicesDep, require_api_key
from gateway.http.uploads import accept, valid_priority

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/documents", dependencies=[Depends(require_api_key)], responses=KEYED)


def valid_collection(collection: str) -> str:
    """The collection name, or a 400 saying what a valid one looks like."""
    if not re.fullmatch(COLLECTION_PATTERN, collection):
        raise ApiError(
            400,
            "invalid_collection",
            f"Collection {collection[:80]!r} is not valid: use 1-63 characters of "
            "a-z, 0-9, '_' and '-', starting with a letter or digit.",
        )
    return collection


async def _collection_of(services: ServicesDep, access: Access, document_id: str) -> str:
    """The document's collection; 404 also when the caller's key does not open it."""
    collection = await asyncio.to_thread(services.store.document_collection, document_id)
    # Another collection's document answers like a missing one, so keys cannot probe ids.
    if collection is None or not access.allows(collection):
        raise ApiError(404, "document_not_found", f"No document {document_id}.")
    return collection


# What an upload or a new version may be refused with (api_responses.py declares them).
_UPLOAD_400 = ["empty_file", "invalid_priority", "invalid_callback_url"]
_UPLOAD_503 = ["broker_unavailable", "job_store_unavailable", "blob_store_unavailable"]


def _answer(status: int, body: object, job_id: str) -> JSONResponse:
    return JSONResponse(
        body,
        status_code=status,
        headers={"Location": f"/v1/jobs/{job_id}"} if status == 202 else None,
    )


@router.post(
    "",
    status_code=202,
    responses={
        **UPLOAD_ANSWERS,
        **errors(
            {
                400: [*_UPLOAD_400, "invalid_collection", "invalid_idempotency_key"],
                403: "collection_forbidden",
                413: "file_too_large",
                415: "unsupported_media_type",
                422: "idempotency_key_reused",
                429: "pipeline_saturated",
                503: _UPLOAD_503,
                507: "storage_full",
            }
        ),
    },
)
async def upload(
    services: ServicesDep,
    access: AccessDep,
    file: Annotated[UploadFile, File()],
    collection: Annotated[str, Form()] = "default",
    idempotency_key: Annotated[str | None, Header()] = None,
    priority: Annotated[str, Form()] = "interactive",
    callback_url: Annotated[str | None, Form()] = None,
    api_key: ApiKeyDep = None,
) -> JSONResponse:
    """Accept one document; 202 once the broker confirmed its first message (a bulk one,
    held for its fair turn, once it is recorded)."""
    access.require(valid_collection(collection))
    lane = valid_priority(priority)
    key = valid_idempotency_key(idempotency_key)
    with metrics.upload_answer() as outcome:
        callback = await resolve_callback_url(callback_url, api_key, services.settings)
        status, answer = await accept(
            services,
            file,
            collection,
            key,
            priority=lane,
            callback_url=callback,
            # Keys are scoped per API key (and collection): one tenant's never meets another's.
            key_owner=key_owner(api_key),
        )
        outcome(status)
    return _answer(status, answer.model_dump(mode="json"), answer.job_id)


@router.put(
    "/{document_id}",
    status_code=202,
    responses={
        **UPLOAD_ANSWERS,
        **errors(
            {
                400: _UPLOAD_400,
                404: "document_not_found",
                413: "file_too_large",
                415: "unsupported_media_type",
                429: "pipeline_saturated",
                503: _UPLOAD_503,
                507: "storage_full",
            }
        ),
    },
)
async def replace(
    services: ServicesDep,
    access: AccessDep,
    document_id: str,
    file: Annotated[UploadFile, File()],
    priority: Annotated[str, Form()] = "interactive",
    callback_url: Annotated[str | None, Form()] = None,
    api_key: ApiKeyDep = None,
) -> JSONResponse:
    """Upload a new version; the old one stays searchable until the new one is indexed."""
    collection = await _collection_of(services, access, document_id)
    lane = valid_priority(priority)
    with metrics.upload_answer() as outcome:
        callback = await resolve_callback_url(callback_url, api_key, services.settings)
        status, answer = await accept(
            services,
            file,
            collection,
            None,
            document_id=document_id,
            priority=lane,
            callback_url=callback,
        )
        outcome(status)
    return _answer(status, answer.model_dump(mode="json"), answer.job_id)


@router.delete(
    "/{document_id}",
    status_code=204,
    responses=errors(
        {
            404: "document_not_found",
            503: ["job_store_unavailable", "index_unavailable", "blob_store_unavailable"],
        }
    ),
)
async def delete(services: ServicesDep, access: AccessDep, document_id: str) -> Response:
    """Remove a document's chunks from the index and its blobs from the blob store; deleting
    a deleted document again answers the same (and finishes what a failed delete left)."""
    # A deleted document is known by its jobs' history, so the key check still applies:
    # another collection's document, deleted or not, answers like one that never was.
    collection = await asyncio.to_thread(services.store.recorded_collection, document_id)
    if collection is None or not access.allows(collection):
        raise ApiError(404, "document_not_found", f"No document {document_id}.")
    # The index first: its tombstone makes every batch still on its way be dropped, so the
    # document cannot come back once this answers.
    # In every generation there is: the serving one and the one a reindex builds.
    for generation in await asyncio.to_thread(_generations, services, collection):
        name = index_name(collection, generation)
        await asyncio.to_thread(services.index.delete_document, name, document_id)
    await asyncio.to_thread(_forget_document, services, document_id)
    # Its jobs stay as history; one still in flight ends now, rather than look busy for ever.
    ended = await asyncio.to_thread(services.store.end_deleted_jobs, document_id)
    for job_id in ended:
        services.changes.notify(job_id)
    if ended:
        services.admissions.set()  # their slots are free for held jobs
    return Response(status_code=204)


def _generations(services: Services, collection: str) -> list[int]:
    """The generations of a collection's index a document may be in."""
    serving = services.store.serving(collection).generation
    active = services.store.active_reindex(collection)
    return sorted({serving, active.generation} if active else {serving})


def _forget_document(services: Services, document_id: str) -> None:
    """Drop the document from the job store and the blobs no live document still uses."""
    for job_blobs in services.store.delete_document(document_id):
        if job_blobs.job_id:
            # What OCR kept of the job's scan on the way (stages/builtin/parse.py).
            services.blobs.delete_notes(f"ocr-{job_blobs.job_id}-")
        for sha256 in (job_blobs.blob_sha256, job_blobs.parsed_sha256):
            if not sha256:
                continue
            if not re.fullmatch(SHA256_PATTERN, sha256):
                # Recorded before events were checked: it names no blob, and a half-done
                # delete must not follow it anywhere (a path, another object).
                log.warning("document %s: skipping a blob name that is no sha256", document_id)
            elif not services.store.blob_in_use(sha256):
                services.blobs.delete(sha256)
