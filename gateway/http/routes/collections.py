"""The collections a caller may use, with how much each holds."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from gateway.http.api_responses import KEYED, errors
from gateway.http.errors import ApiError
from gateway.http.routes.documents import valid_collection
from gateway.http.services import AccessDep, ServicesDep, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=KEYED)


class CollectionSummary(BaseModel):
    """One collection: its documents (in any state) and the chunks indexed for them."""

    collection: str
    documents: int
    chunks: int


class Collections(BaseModel):
    """Every collection with a document that the caller's key may use, by name."""

    collections: list[CollectionSummary]


@router.get("/collections", responses=errors({503: "job_store_unavailable"}))
async def list_collections(services: ServicesDep, access: AccessDep) -> Collections:
    """The collections the caller may use that hold documents (the page offers them)."""
    found = await asyncio.to_thread(services.store.collections)
    return Collections(
        collections=[
            CollectionSummary(collection=c.collection, documents=c.documents, chunks=c.chunks)
            for c in found
            if access.allows(c.collection)
        ]
    )


@router.get(
    "/collections/{collection}",
    responses=errors(
        {
            400: "invalid_collection",
            403: "collection_forbidden",
            404: "collection_not_found",
            503: "job_store_unavailable",
        }
    ),
)
async def collection(
    services: ServicesDep, access: AccessDep, collection: str
) -> CollectionSummary:
    """One collection's documents and chunks; 404 when it holds no document."""
    access.require(valid_collection(collection))
    found = await asyncio.to_thread(services.store.collections)
    for c in found:
        if c.collection == collection:
            return CollectionSummary(
                collection=c.collection, documents=c.documents, chunks=c.chunks
            )
    raise ApiError(404, "collection_not_found", f"Collection {collection!r} holds no document.")
