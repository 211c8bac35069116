"""Semantic search over one collection."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

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
            400: ["empty_query", "invalid_collection"],
            403: "collection_forbidden",
            503: ["embedding_unavailable", "index_unavailable"],
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
    """Embed the query with the pipeline's model and return the nearest chunks."""
    if not q.strip():
        raise ApiError(400, "empty_query", "Give a query: /v1/search?q=...")
    access.require(valid_collection(collection))
    embedder = await services.embedder()
    (vector,) = await asyncio.to_thread(embedder.embed, [embedding_text(None, q)])
    hits = await asyncio.to_thread(services.index.search, collection, vector, k)
    return SearchResults(results=[SearchHit.of(hit) for hit in hits])
