"""Uploads, new versions, and deletion of documents."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Response, UploadFile
from fastapi.responses import JSONResponse

from contracts.messages import COLLECTION_PATTERN
from gateway.http import gateway_metrics as metrics
from gateway.http.callbacks import ApiKeyDep, resolve_callback_url
from gateway.http.errors import ApiError
from gateway.http.services import Access, AccessDep, Services, ServicesDep, require_api_key
from gateway.http.uploads import accept, valid_priority

router = APIRouter(prefix="/v1/documents", dependencies=[Depends(require_api_key)])


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


def _answer(status: int, body: object, job_id: str) -> JSONResponse:
    return JSONResponse(
        body,
        status_code=status,
        headers={"Location": f"/v1/jobs/{job_id}"} if status == 202 else None,
    )


@router.post("", status_code=202)
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
    with metrics.upload_answer() as outcome:
        callback = await resolve_callback_url(callback_url, api_key, services.settings)
        status, answer = await accept(
            services, file, collection, idempotency_key, priority=lane, callback_url=callback
        )
        outcome(status)
    return _answer(status, answer.model_dump(mode="json"), answer.job_id)


@router.put("/{document_id}", status_code=202)
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


@router.delete("/{document_id}", status_code=204)
async def delete(services: ServicesDep, access: AccessDep, document_id: str) -> Response:
    """Remove a document's chunks from the index and its blobs from the blob store."""
    collection = await _collection_of(services, access, document_id)
    await asyncio.to_thread(services.index.delete_document, collection, document_id)
    await asyncio.to_thread(_forget_document, services, document_id)
    return Response(status_code=204)


def _forget_document(services: Services, document_id: str) -> None:
    """Drop the document from the job store and the blobs no live document still uses."""
    for job_blobs in services.store.delete_document(document_id):
        for sha256 in (job_blobs.blob_sha256, job_blobs.parsed_sha256):
            if sha256 and not services.store.blob_in_use(sha256):
                services.blobs.delete(sha256)
