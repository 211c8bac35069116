"""Phase "lanes": interactive work before a bulk backlog, fair share between collections, and
what lanes cost when there is only one kind of work — each with lanes on and off (one FIFO
per stage, as before lanes), side by side in one run.

All times are the gateway's: a job's `created_at` to its index stage's `finished_at`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from broker import BrokerHandle
from pipeline import stop_pipeline

from bench.corpus import Document
from bench.http_load import (
    Job,
    finished_at,
    jobs_in,
    percentile,
    upload_all,
    upload_paced,
    wait_until_done,
)
from bench.sluice_run import EndToEnd, end_to_end, keep_logs, launch

# Uploaders for the backlogs: enough to queue thousands in seconds.
_BACKLOG_CLIENTS = 8


@dataclass(frozen=True)
class Latency:
    """Interactive uploads, one a second, behind a bulk backlog of another collection."""

    lanes: bool
    bulk_docs: int
    interactive_docs: int
    # Upload to indexed, seconds, per interactive document.
    interactive_s: list[float]
    # Bulk documents indexed per second before the interactive uploads began (once the bulk
    # uploads were done and it flowed), and while they were in flight (first upload to last
    # one indexed).
    bulk_per_s_before: float
    bulk_per_s_during: float
    # Bulk documents not yet indexed when the last interactive one was: the backlog was
    # still there (else the figure says nothing).
    bulk_left_at_end: int

    @property
    def p50_s(self) -> float:
        """Median upload-to-indexed time of the interactive documents."""
        return percentile(self.interactive_s, 50)

    @property
    def p95_s(self) -> float:
        """95th percentile upload-to-indexed time of the interactive documents."""
        return percentile(self.interactive_s, 95)

    @property
    def max_s(self) -> float:
        """Slowest interactive document, upload to indexed."""
        return max(self.interactive_s, default=0.0)

    @property
    def bulk_kept(self) -> float:
        """Bulk throughput with interactive load over bulk throughput without it."""
        return self.bulk_per_s_during / self.bulk_per_s_before if self.bulk_per_s_before else 0.0


@dataclass(frozen=True)
class Fairness:
    """One collection's few bulk documents, alone and behind another collection's backlog."""

    lanes: bool
    backlog_docs: int
    docs: int
    alone_s: float
    behind_backlog_s: float

    @property
    def ratio(self) -> float:
        """How many times longer the few took behind the backlog than alone."""
        return self.behind_backlog_s / self.alone_s if self.alone_s else 0.0


@dataclass(frozen=True)
class LanesRun:
    """Everything the phase measured."""

    latency: list[Latency]
    fairness: list[Fairness]
    # One kind of work only (the corpus, interactive): lanes on, lanes off; and the corpus
    # all bulk with lanes on (admitted through the fair-share gate).
    only_interactive_on: EndToEnd
    only_interactive_off: EndToEnd
    only_bulk_on: EndToEnd

    @property
    def cost_ratio(self) -> float:
        """End-to-end throughput with lanes over without, one kind of work."""
        off = self.only_interactive_off.chunks_per_s
        return self.only_interactive_on.chunks_per_s / off if off else 0.0


def lanes(
    broker: BrokerHandle,
    root: Path,
    corpus: list[Document],
    bulk: list[Document],
    interactive: list[Document],
    *,
    fairness_backlog: int,
    clients: int,
    deadline_s: float,
) -> LanesRun:
    """Run the three measurements, each with lanes on and off."""
    few = interactive  # 20 single-page documents: the small collection of the fairness run
    latency_runs = [
        _run_latency(broker, root / f"latency-{on}", bulk, interactive, on, deadline_s)
        for on in (True, False)
    ]
    fairness_runs = [
        _run_fairness(broker, root / f"fair-{on}", bulk[:fairness_backlog], few, on, deadline_s)
        for on in (True, False)
    ]
    print("  one kind of work: the corpus, interactive, lanes on then off", flush=True)
    on = end_to_end(
        broker, root / "cost-on", corpus, clients=clients, deadline_s=deadline_s, SLUICE_LANES="1"
    )
    off = end_to_end(
        broker, root / "cost-off", corpus, clients=clients, deadline_s=deadline_s, SLUICE_LANES="0"
    )
    bulk_on = end_to_end(
        broker,
        root / "cost-bulk",
        corpus,
        clients=clients,
        deadline_s=deadline_s,
        priority="bulk",
        SLUICE_LANES="1",
    )
    return LanesRun(latency_runs, fairness_runs, on, off, bulk_on)


def _run_latency(
    broker: BrokerHandle,
    root: Path,
    bulk: list[Document],
    interactive: list[Document],
    on: bool,
    deadline_s: float,
) -> Latency:
    print(f"  lanes {'on' if on else 'off'}: {len(bulk)} bulk, then interactive", flush=True)
    pipeline = launch(broker, root, SLUICE_LANES="1" if on else "0")
    try:
        return asyncio.run(_latency(pipeline.url, bulk, interactive, on, deadline_s))
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)


async def _latency(
    url: str, bulk: list[Document], interactive: list[Document], on: bool, deadline_s: float
) -> Latency:
    _accepted(await upload_all(url, "bulk-a", bulk, _BACKLOG_CLIENTS, priority="bulk"))
    # Bulk's own pace is measured once it flows and the uploads are done (they share the
    # machine), over at least as long a window as the interactive uploads take.
    uploaded = datetime.now(UTC)
    window_s = float(len(interactive))
    await _until_indexed(url, "bulk-a", min(50, len(bulk) // 10), deadline_s)
    await asyncio.sleep(window_s)
    began = datetime.now(UTC)
    _accepted(await upload_paced(url, "inter-b", interactive, 1, 1.0))
    done = await wait_until_done(url, "inter-b", len(interactive), deadline_s)
    seconds = [_took_s(job) for job in done]
    last = max(_ended(job) for job in done)
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        bulk_jobs = [job async for job in jobs_in(client, "bulk-a")]
    ends = [end for job in bulk_jobs if (end := finished_at(job, "index")) is not None]
    first = max(uploaded, min(ends))
    before = sum(first <= end < began for end in ends)
    during = sum(began <= end <= last for end in ends)
    return Latency(
        lanes=on,
        bulk_docs=len(bulk),
        interactive_docs=len(interactive),
        interactive_s=seconds,
        bulk_per_s_before=before / max((began - first).total_seconds(), 1e-9),
        bulk_per_s_during=during / max((last - began).total_seconds(), 1e-9),
        bulk_left_at_end=len(bulk) - sum(end <= last for end in ends),
    )


def _run_fairness(
    broker: BrokerHandle,
    root: Path,
    backlog: list[Document],
    few: list[Document],
    on: bool,
    deadline_s: float,
) -> Fairness:
    print(
        f"  lanes {'on' if on else 'off'}: {len(few)} bulk alone, then behind {len(backlog)}",
        flush=True,
    )
    pipeline = launch(broker, root, SLUICE_LANES="1" if on else "0")
    try:
        return asyncio.run(_fairness(pipeline.url, backlog, few, on, deadline_s))
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)


async def _fairness(
    url: str, backlog: list[Document], few: list[Document], on: bool, deadline_s: float
) -> Fairness:
    alone_s = await _collection_time(url, "c-alone", few, deadline_s)
    _accepted(await upload_all(url, "a-big", backlog, _BACKLOG_CLIENTS, priority="bulk"))
    await _until_indexed(url, "a-big", min(20, len(backlog) // 10), deadline_s)
    behind_s = await _collection_time(url, "c-shared", few, deadline_s)
    return Fairness(on, len(backlog), len(few), alone_s, behind_s)


async def _collection_time(
    url: str, collection: str, docs: list[Document], deadline_s: float
) -> float:
    """Seconds from the first bulk upload of `docs` into `collection` to the last indexed."""
    began = datetime.now(UTC)
    _accepted(await upload_all(url, collection, docs, 4, priority="bulk"))
    done = await wait_until_done(url, collection, len(docs), deadline_s)
    return (max(_ended(job) for job in done) - began).total_seconds()


async def _until_indexed(url: str, collection: str, count: int, deadline_s: float) -> None:
    """Wait until `count` jobs of the collection are indexed."""
    end = time.monotonic() + deadline_s
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        while True:
            params: dict[str, str | int] = {
                "collection": collection,
                "status": "indexed",
                "limit": max(count, 1),
            }
            page = (await client.get("/v1/jobs", params=params)).raise_for_status().json()
            if len(page["jobs"]) >= count:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"{collection}: {count} documents not indexed in time")
            await asyncio.sleep(0.5)


def _accepted(answers: list[Any]) -> None:
    refused = [a for a in answers if a.status not in (200, 202)]
    if refused:
        raise RuntimeError(f"{len(refused)} uploads refused, first: {refused[0]}")


def _ended(job: Job) -> datetime:
    end = finished_at(job, "index")
    return end if end is not None else datetime.fromisoformat(job["updated_at"])


def _took_s(job: Job) -> float:
    return (_ended(job) - datetime.fromisoformat(job["created_at"])).total_seconds()
