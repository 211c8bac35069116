"""HTTP clients for the benchmark: bounded concurrent uploads, timed, and job-status polling."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from bench.corpus import Document

Job = dict[str, Any]
TERMINAL = {"indexed", "failed"}


@dataclass(frozen=True)
class Answer:
    """One upload's answer: HTTP status, how long it took, and its JSON body."""

    status: int
    ms: float
    body: dict[str, Any]


def percentile(values: Iterable[float], pct: int) -> float:
    """The `pct`-th percentile (inclusive method); 0 for no values."""
    data = sorted(values)
    if len(data) < 2:
        return data[0] if data else 0.0
    return statistics.quantiles(data, n=100, method="inclusive")[pct - 1]


async def upload(
    client: httpx.AsyncClient, collection: str, doc: Document, priority: str = "interactive"
) -> Answer:
    """POST one document (in the lane `priority`) and time it from request to answer."""
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/documents",
            files={"file": (doc.name, doc.data)},
            data={"collection": collection, "priority": priority},
        )
    except httpx.TransportError as exc:
        # A dropped connection is an answer too (status 0): counted, not fatal to the run.
        return Answer(0, (time.perf_counter() - started) * 1000, {"error": repr(exc)})
    ms = (time.perf_counter() - started) * 1000
    body = response.json() if response.content else {}
    return Answer(response.status_code, ms, body)


async def upload_all(
    url: str,
    collection: str,
    docs: list[Document],
    clients: int,
    timeout_s: float = 600.0,
    priority: str = "interactive",
) -> list[Answer]:
    """Upload every document with `clients` concurrent clients, each one request at a time."""
    pending = iter(docs)
    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one_client() -> None:
            # A shared iterator hands each document to exactly one client.
            for doc in pending:
                answers.append(await upload(client, collection, doc, priority))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return answers


async def upload_paced(
    url: str,
    collection: str,
    docs: list[Document],
    clients: int,
    interval_s: float,
    priority: str = "interactive",
) -> list[Answer]:
    """Upload every document with `clients` clients, each starting one upload every
    `interval_s` (spread over the interval, so `clients / interval_s` uploads/s are offered);
    a client whose answer comes late sends its next upload at once."""
    pending = iter(docs)
    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:

        async def one_client(n: int) -> None:
            due = time.monotonic() + interval_s * n / clients
            for doc in pending:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval_s
                answers.append(await upload(client, collection, doc, priority))

        await asyncio.gather(*(one_client(n) for n in range(clients)))
    return answers


async def jobs_in(client: httpx.AsyncClient, collection: str) -> AsyncIterator[Job]:
    """Every job in the collection, following the cursor."""
    params: dict[str, str | int] = {"collection": collection, "limit": 500}
    while True:
        page = (await client.get("/v1/jobs", params=params)).raise_for_status().json()
        for job in page["jobs"]:
            yield job
        if not page["next_cursor"]:
            return
        params["cursor"] = page["next_cursor"]


async def wait_until_done(
    url: str, collection: str, expected: int, deadline_s: float, poll_s: float = 0.5
) -> list[Job]:
    """Poll until `expected` jobs of the collection are indexed or failed; raise at the deadline."""
    end = time.monotonic() + deadline_s
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        while True:
            jobs = [job async for job in jobs_in(client, collection)]
            if len(jobs) >= expected and all(j["status"] in TERMINAL for j in jobs):
                return jobs
            if time.monotonic() > end:
                done = sum(j["status"] in TERMINAL for j in jobs)
                raise TimeoutError(
                    f"{collection}: {done}/{expected} jobs finished after {deadline_s:.0f} s"
                )
            await asyncio.sleep(poll_s)


def finished_at(job: Job, stage: str) -> datetime | None:
    """When a stage finished a job, by the server's clock."""
    stamp = (job["stages"].get(stage) or {}).get("finished_at")
    return datetime.fromisoformat(stamp) if stamp else None
