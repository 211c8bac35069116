"""The collections a caller may use, with how much each holds."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from contracts.settings import Settings
from gateway.http.api_responses import KEYED, errors
from gateway.http.errors import ApiError
from gateway.http.reindex_schemas import Generation, IndexSettings, ReindexOut
from gateway.http.routes.documents import valid_collection
from gateway.http.services import AccessDep, ServicesDep, require_api_key
from gateway.store.base import CollectionCounts

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=KEYED)


class CollectionSummary(BaseModel):
    """One collection: its documents (in any state), the chunks indexed for them in the
    generation search answers from, that generation and its settings, and its reindex."""

    collection: str
    documents: int
    chunks: int
    # The generation search answers from: its number and settings (also given as `settings`).
    generation: Generation
    settings: IndexSettings
    # The reindex under way, else the newest one (ended); null if there never was one.
    reindex: ReindexOut | None = None

    @classmethod
    def of(cls, settings: Settings, counts: CollectionCounts) -> CollectionSummary:
        """The API's shape of a collection as the store counts it."""
        return cls(
            collection=counts.collection,
            documents=counts.documents,
            chunks=counts.chunks,
            generation=Generation.numbered(settings, counts.generation, counts.profile),
            settings=IndexSettings.of(settings, counts.profile),
            reindex=ReindexOut.of(settings, counts.reindex) if counts.reindex else None,
        )


class Collections(BaseModel):
    """Every collection with a document that the caller's key may use, by name."""

    collections: list[CollectionSummary]


@router.get("/collections", responses=errors({503: "job_store_unavailable"}))
async def list_collections(services: ServicesDep, access: AccessDep) -> Collections:
    """The collections the caller may use that hold documents (the page offers them)."""
    found = await asyncio.to_thread(services.store.collections)
    return Collections(
        collections=[
            CollectionSummary.of(services.settings, c) for c in found if access.allows(c.collection)
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
    """One collection's documents, chunks, serving generation and reindex; 404 when it holds
    no document."""
    access.require(valid_collection(collection))
    found = await asyncio.to_thread(services.store.collections)
    for c in found:
        if c.collection == collection:
            return CollectionSummary.of(services.settings, c)
    raise ApiError(404, "collection_not_found", f"Collection {collection!r} holds no document.")
