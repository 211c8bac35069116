"""Re-indexing a collection into a new generation (chunk sizes, model) while search keeps
answering from the serving one; gateway/http/reindex_monitor.py moves it on."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from contracts.errors import Permanent
from contracts.generations import chunk_sizes
from gateway.http.api_responses import KEYED, errors, json_answer
from gateway.http.errors import ApiError
from gateway.http.reindex_schemas import ReindexOut, ReindexRequest
from gateway.http.routes.documents import valid_collection
from gateway.http.services import AccessDep, ServicesDep, require_api_key
from gateway.store.reindex_base import ReindexInProgress
from stages.backends.factory import resolve_model_dir

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=KEYED)

_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ReindexRequest.model_json_schema()}},
    }
}


async def _request_of(request: Request) -> ReindexRequest:
    """The body as a reindex request: 400 if it is no JSON, 422 if its settings are refused."""
    try:
        raw: Any = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise ApiError(400, "invalid_request", f"body: not JSON ({exc})") from exc
    try:
        return ReindexRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_reindex", f"{where}: {first.get('msg', 'invalid')}") from exc


@router.post(
    "/collections/{collection}/reindex",
    status_code=202,
    openapi_extra=_BODY,
    responses={
        **json_answer(202, ReindexOut, "The reindex, recorded: it runs in the background."),
        **errors(
            {
                400: ["invalid_collection", "invalid_request"],
                403: "collection_forbidden",
                404: "collection_not_found",
                409: "reindex_in_progress",
                422: ["invalid_reindex", "invalid_profile", "unknown_model"],
                503: "job_store_unavailable",
            }
        ),
    },
)
async def start(
    services: ServicesDep, access: AccessDep, collection: str, request: Request
) -> JSONResponse:
    """Start re-indexing a collection with new chunk sizes or model; 202 with the reindex."""
    access.require(valid_collection(collection))
    body = await _request_of(request)
    settings = services.settings
    try:
        if body.model is not None:
            # Cheap: the directory is checked, not loaded (the embed stage loads it).
            await asyncio.to_thread(resolve_model_dir, settings, body.model)
    except Permanent as exc:
        raise ApiError(422, exc.code, exc.message) from exc
    found = await asyncio.to_thread(services.store.collections)
    if not any(c.collection == collection for c in found):
        raise ApiError(404, "collection_not_found", f"Collection {collection!r} holds no document.")
    # What it builds: the serving generation's settings, with what the body names instead.
    serving = await asyncio.to_thread(services.store.serving, collection)
    profile = body.over(serving.profile)
    try:
        chunk_sizes(settings, profile)
    except Permanent as exc:
        raise ApiError(422, exc.code, exc.message) from exc
    try:
        reindex = await asyncio.to_thread(
            services.store.start_reindex, uuid.uuid4().hex, collection, profile
        )
    except ReindexInProgress as exc:
        raise ApiError(409, exc.code, exc.message) from exc
    services.reindexes.set()
    answer = ReindexOut.of(settings, reindex)
    return JSONResponse(
        answer.model_dump(mode="json"),
        status_code=202,
        headers={"Location": answer.status_url},
    )


@router.get(
    "/collections/{collection}/reindex",
    responses=errors(
        {
            400: "invalid_collection",
            403: "collection_forbidden",
            404: "no_reindex",
            503: "job_store_unavailable",
        }
    ),
)
async def current(services: ServicesDep, access: AccessDep, collection: str) -> ReindexOut:
    """The collection's reindex under way, else its newest one; 404 if it never had one."""
    access.require(valid_collection(collection))
    latest = await asyncio.to_thread(services.store.latest_reindexes)
    reindex = latest.get(collection)
    if reindex is None:
        raise ApiError(404, "no_reindex", f"Collection {collection!r} was never re-indexed.")
    return ReindexOut.of(services.settings, reindex)


@router.delete(
    "/collections/{collection}/reindex",
    responses=errors(
        {
            400: "invalid_collection",
            403: "collection_forbidden",
            404: "no_reindex",
            503: "job_store_unavailable",
        }
    ),
)
async def cancel(services: ServicesDep, access: AccessDep, collection: str) -> ReindexOut:
    """Cancel the collection's reindex; search keeps its serving generation."""
    access.require(valid_collection(collection))
    reindex = await asyncio.to_thread(services.store.cancel_reindex, collection)
    if reindex is None:
        raise ApiError(404, "no_reindex", f"Collection {collection!r} is not being re-indexed.")
    services.reindexes.set()  # its generation goes once its jobs ended
    return ReindexOut.of(services.settings, reindex)
