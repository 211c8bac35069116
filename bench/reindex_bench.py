"""A collection re-indexed under search load: how long it takes, and what searchers see meanwhile.

The `reindex` phase of `python -m bench.run`: a fresh Sluice ingests the corpus into one
collection, closed-loop searchers time `GET /v1/search` for a fixed set of queries, and
`POST /v1/collections/{c}/reindex` rebuilds the collection with other chunk sizes while they
keep searching (docs/API.md, Reindex). Every search is recorded; one during the reindex fails
if it is not answered 200, or answers no result for a query that had results before.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from broker import BrokerHandle
from pipeline import stop_pipeline

from bench.answer_time import WORDS
from bench.corpus import Document
from bench.http_load import percentile, upload_all, wait_until_done
from bench.sluice_run import keep_logs, launch

COLLECTION = "reindexed"
# Half the default chunk size (256): every document is cut again, and there are more chunks.
CHUNK_MAX_TOKENS = 128
SEARCHERS = 4
QUERIES = 12
BEFORE_S = 20.0
# The old generation is dropped a few seconds after the switch: searches then are watched too.
AFTER_S = 10.0
POLL_S = 0.5
_EXAMPLES = 5
# A reindex ends in one of these (docs/API.md); only "done" is a success.
_ENDED = {"done", "failed", "cancelled"}


class ReindexUnavailable(RuntimeError):
    """The gateway has no reindex API (404 on its route): it predates the feature."""


@dataclass(frozen=True)
class Search:
    """One search: the window it started in, its query, answer status, latency and hit count."""

    window: str
    query: str
    status: int
    ms: float
    hits: int


@dataclass(frozen=True)
class SearchWindow:
    """The searches started in one window: how many, how many failed, latency percentiles."""

    searches: int
    failed: int
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    # A few failures as "status, hits, query", for a person to read.
    examples: list[str]


@dataclass(frozen=True)
class ReindexRun:
    """The corpus re-indexed under search load: before and after counts, time, search figures."""

    documents: int
    failed_uploads: int
    chunks_before: int
    documents_after: int
    chunks_after: int
    generation_before: int
    generation_after: int
    chunk_max_tokens: int
    # "done", "failed" or "cancelled": anything but "done" is recorded as the phase's error.
    state: str
    documents_done: int
    documents_failed: int
    ingest_s: float
    # POST sent to the first poll that saw the reindex ended (client clock).
    wall_s: float
    # The reindex's own started_at to finished_at (server clock); None if it gave no times.
    server_s: float | None
    searchers: int
    queries: int
    before_s: float
    after_s: float
    before: SearchWindow
    during: SearchWindow
    after: SearchWindow


def queries(count: int = QUERIES) -> list[str]:
    """A fixed set of three-word queries from the corpus's word list (seeded)."""
    rng = random.Random("reindex-queries")
    content = [w for w in WORDS if len(w) > 3]
    return [" ".join(rng.sample(content, 3)) for _ in range(count)]


def reindex_under_search(
    broker: BrokerHandle, root: Path, docs: list[Document], *, clients: int, deadline_s: float
) -> ReindexRun:
    """Start a fresh Sluice, ingest `docs` into one collection, then re-index it with
    `CHUNK_MAX_TOKENS` while closed-loop searchers run."""
    pipeline = launch(broker, root)
    try:
        return asyncio.run(_run(pipeline.url, docs, clients, deadline_s))
    except ReindexUnavailable:
        raise  # the gateway's logs say nothing about a route it does not have
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)


async def _run(url: str, docs: list[Document], clients: int, deadline_s: float) -> ReindexRun:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        # Before minutes of ingestion: a gateway without the API says so at once.
        await _require_reindex_api(client)
        started = time.monotonic()
        answers = await upload_all(url, COLLECTION, docs, clients)
        if refused := [a for a in answers if a.status != 202]:
            raise RuntimeError(f"{len(refused)} uploads refused, first: {refused[0]}")
        jobs = await wait_until_done(url, COLLECTION, len(docs), deadline_s)
        ingest_s = time.monotonic() - started
        failed_uploads = sum(j["status"] == "failed" for j in jobs)
        before = await _collection(client)
        print(
            f"  {before['documents']} documents, {before['chunks']} chunks in {ingest_s:.0f} s; "
            f"searching for {BEFORE_S:.0f} s before the reindex",
            flush=True,
        )
        searchers = Searchers(client, queries())
        await searchers.warm_up()
        search_task = asyncio.create_task(searchers.run())
        try:
            await asyncio.sleep(BEFORE_S)
            searchers.window = "during"
            posted = time.monotonic()
            reindex_id = await _start_reindex(client)
            ended = await _wait_ended(client, reindex_id, deadline_s)
            wall_s = time.monotonic() - posted
            searchers.window = "after"
            print(
                f"  reindex {ended['state']} in {wall_s:.1f} s; searching {AFTER_S:.0f} s more",
                flush=True,
            )
            await asyncio.sleep(AFTER_S)
        finally:
            searchers.stop()
            await search_task
        after = await _collection(client)
    return ReindexRun(
        documents=len(jobs),
        failed_uploads=failed_uploads,
        chunks_before=before["chunks"],
        documents_after=after["documents"],
        chunks_after=after["chunks"],
        generation_before=before["generation"]["number"],
        generation_after=after["generation"]["number"],
        chunk_max_tokens=CHUNK_MAX_TOKENS,
        state=ended["state"],
        documents_done=ended["documents_done"],
        documents_failed=ended["documents_failed"],
        ingest_s=ingest_s,
        wall_s=wall_s,
        server_s=_server_s(ended),
        searchers=SEARCHERS,
        queries=len(searchers.queries),
        before_s=BEFORE_S,
        after_s=AFTER_S,
        **searchers.windows(),
    )


class Searchers:
    """`SEARCHERS` closed-loop clients, each searching the queries in turn; every answer kept."""

    def __init__(self, client: httpx.AsyncClient, queries: list[str]) -> None:
        self.client = client
        self.queries = queries
        # Which window a search that starts now belongs to; the phase moves it on.
        self.window = "before"
        self.searches: list[Search] = []
        self._stop = asyncio.Event()

    async def search(self, query: str) -> Search:
        """One timed `GET /v1/search`; a dropped connection is an answer too (status 0)."""
        window, started = self.window, time.perf_counter()
        try:
            response = await self.client.get(
                "/v1/search", params={"q": query, "collection": COLLECTION, "k": 5}
            )
        except httpx.TransportError:
            return Search(window, query, 0, (time.perf_counter() - started) * 1000, 0)
        ms = (time.perf_counter() - started) * 1000
        hits = len(response.json().get("results", [])) if response.status_code == 200 else 0
        return Search(window, query, response.status_code, ms, hits)

    async def warm_up(self) -> None:
        """Each query once, untimed: the gateway loads its embedder on the first search."""
        for query in self.queries:
            found = await self.search(query)
            if found.status != 200:
                raise RuntimeError(f"search {query!r} answered {found.status} before the reindex")

    async def run(self) -> None:
        """Search until stopped."""

        async def one(n: int) -> None:
            turn = n
            while not self._stop.is_set():
                self.searches.append(await self.search(self.queries[turn % len(self.queries)]))
                turn += 1

        await asyncio.gather(*(one(n) for n in range(SEARCHERS)))

    def stop(self) -> None:
        """Let each searcher end after its search in hand."""
        self._stop.set()

    def windows(self) -> dict[str, SearchWindow]:
        """The figures of the before, during and after windows."""
        had_results = {
            s.query for s in self.searches if s.window == "before" and s.status == 200 and s.hits
        }

        def failed(s: Search) -> bool:
            return s.status != 200 or (s.query in had_results and s.hits == 0)

        out: dict[str, SearchWindow] = {}
        for window in ("before", "during", "after"):
            mine = [s for s in self.searches if s.window == window]
            bad = [s for s in mine if failed(s)]
            out[window] = SearchWindow(
                searches=len(mine),
                failed=len(bad),
                p50_ms=percentile((s.ms for s in mine), 50),
                p99_ms=percentile((s.ms for s in mine), 99),
                statuses=dict(sorted(Counter(s.status for s in mine).items())),
                examples=[f"{s.status}, {s.hits} hits, {s.query!r}" for s in bad[:_EXAMPLES]],
            )
        return out


async def _require_reindex_api(client: httpx.AsyncClient) -> None:
    """Fail unless the gateway serves the reindex routes: for a collection never re-indexed
    they answer 404 `no_reindex`; a gateway without them, 404 `not_found`."""
    response = await client.get(f"/v1/collections/{COLLECTION}/reindex")
    if response.status_code == 404 and _code(response) != "no_reindex":
        raise ReindexUnavailable(_missing(f"GET /v1/collections/{COLLECTION}/reindex", response))


async def _start_reindex(client: httpx.AsyncClient) -> str:
    """POST the reindex; its id."""
    route = f"/v1/collections/{COLLECTION}/reindex"
    response = await client.post(route, json={"chunk_max_tokens": CHUNK_MAX_TOKENS})
    if response.status_code == 404 and _code(response) != "collection_not_found":
        raise ReindexUnavailable(_missing(f"POST {route}", response))
    if response.status_code != 202:
        raise RuntimeError(f"POST {route} answered {response.status_code}: {response.text[:500]}")
    reindex_id: str = response.json()["reindex_id"]
    return reindex_id


async def _wait_ended(client: httpx.AsyncClient, reindex_id: str, deadline_s: float) -> Any:
    """Poll the collection until its reindex `reindex_id` has ended; its last state."""
    end = time.monotonic() + deadline_s
    while True:
        reindex = (await _collection(client)).get("reindex") or {}
        if reindex.get("reindex_id") == reindex_id:
            state = reindex.get("state") or reindex.get("status")
            if state in _ENDED:
                return reindex | {"state": state}
        if time.monotonic() > end:
            raise TimeoutError(
                f"reindex {reindex_id} of {COLLECTION} not ended after {deadline_s:.0f} s: "
                f"{reindex}"
            )
        await asyncio.sleep(POLL_S)


async def _collection(client: httpx.AsyncClient) -> Any:
    """`GET /v1/collections/{c}`: documents, chunks, serving generation, reindex."""
    return (await client.get(f"/v1/collections/{COLLECTION}")).raise_for_status().json()


def _server_s(reindex: dict[str, Any]) -> float | None:
    """The reindex's own duration, from its started_at and finished_at."""
    started, finished = reindex.get("started_at"), reindex.get("finished_at")
    if not started or not finished:
        return None
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def _code(response: httpx.Response) -> str | None:
    """The API error's code (`{"error": {"code", ...}}`), if the body has one."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(code)


def _missing(route: str, response: httpx.Response) -> str:
    return (
        f"{route} answered 404 {response.text[:200]}: this gateway has no reindex API "
        "(docs/API.md, Reindex). Run the phase on a tree with the reindex routes merged."
    )
