"""Semantic search over one collection."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from contracts.generations import index_name
from gateway.http.api_responses import KEYED, errors
from gateway.http.errors import ApiError
from gateway.http.routes.documents import valid_collection
from gateway.http.schemas import SearchHit
from gateway.http.services import AccessDep, ServicesDep, require_api_key
from stages.backends.protocols import embedding_text

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=KEYED)


class SearchResults(BaseModel):
    """Search hits, best first."""

    results: list[SearchHit]


@router.get(
    "/search",
    responses=errors(
        {
            400: ["empty_query", "invalid_collection", "unknown_model"],
            403: "collection_forbidden",
            503: ["embedding_unavailable", "index_unavailable", "job_store_unavailable"],
        }
    ),
)
async def search(
    services: ServicesDep,
    access: AccessDep,
    q: str = "",
    collection: str = "default",
    k: Annotated[int, Query(ge=1, le=100)] = 5,
) -> SearchResults:
    """Embed the query with the serving generation's model and return the nearest chunks of
    that generation (a reindex under way builds the next one beside it, unseen)."""
    if not q.strip():
        raise ApiError(400, "empty_query", "Give a query: /v1/search?q=...")
    access.require(valid_collection(collection))
    serving = await asyncio.to_thread(services.store.serving, collection)
    while True:
        embedder = await services.embedder(serving.profile.model if serving.profile else None)
        (vector,) = await asyncio.to_thread(embedder.embed, [embedding_text(None, q)])
        name = index_name(collection, serving.generation)
        hits = await asyncio.to_thread(services.index.search, name, vector, k)
        # A switch meanwhile: the generation searched is on its way out (the monitor drops
        # it soon after), so the answer comes from the one that serves now.
        now = await asyncio.to_thread(services.store.serving, collection)
        if now == serving:
            break
        serving = now
    return SearchResults(results=[SearchHit.of(hit) for hit in hits])
