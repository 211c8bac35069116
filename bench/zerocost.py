"""The most a GPU could get from Sluice on this machine: the whole real pipeline (gateway over
HTTP, real parse, chunk and index writes into LanceDB) with only the embedder replaced by a
zero-cost one, and what each process costs per chunk.

The embed stage runs the real embed handler and runtime with `ZeroCostEmbedder`
(`python -m bench.passthrough embed`), so its CPU is the runtime's alone. The tracker runs
inside the gateway process, so its share is measured apart: every job event of the run is
recorded from a queue of our own bound beside the tracker's, and folded again afterwards by a
fresh `Tracker` into a fresh job store of the default kind, timed with `time.process_time`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage
from broker import BrokerHandle
from pipeline import Pipeline, launch, stop_pipeline

from bench.corpus import Document
from bench.cpu import CpuMeter
from bench.http_load import finished_at, upload_all, wait_until_done
from bench.sluice_run import DEFAULTS, keep_logs, pids
from bench.throughput import Throughput
from contracts import routing
from contracts.settings import Settings
from gateway.http.services import JobChanges
from gateway.store.base import NewJob, open_job_store
from gateway.store.tracker import PREFETCH, Tracker
from stages.infra.broker import Broker
from stages.infra.signing import message_secret

# The processes whose CPU is divided by the chunks; the gateway's share has the tracker's taken
# out (`ZeroCost.chunks_per_cpu_s`).
PROCESSES = ("parse", "chunk", "embed", "index", "gateway")
# No new job event for this long after the last job ended: the recording has them all.
QUIET_S = 1.0


@dataclass(frozen=True)
class RecordedDelivery:
    """Test double of an incoming AMQP message: one recorded job-event delivery, replayed into
    a tracker (which reads its body, headers and routing key, and acks it)."""

    body: bytes
    headers: dict[str, Any]
    routing_key: str | None
    message_id: str | None = None

    async def ack(self, multiple: bool = False) -> None:
        """Nothing to acknowledge: the delivery is a recording."""

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        """Nothing to hand back: the delivery is a recording."""

    async def reject(self, requeue: bool = False) -> None:
        """Nothing to hand back: the delivery is a recording."""


@dataclass(frozen=True)
class ZeroCost(Throughput):
    """The corpus `repeat` times through the real pipeline with a zero-cost embedder, first
    upload to last index write, and the CPU each process spent on it."""

    repeat: int
    failed: int
    # CPU seconds per process (and the broker, this client, the rest of the machine).
    cpu_s: dict[str, float]
    # Job-event deliveries the tracker consumed, and its CPU seconds folding them again.
    event_deliveries: int
    tracker_cpu_s: float

    @property
    def gateway_without_tracker_cpu_s(self) -> float:
        """The gateway process's CPU less the tracker's (which runs inside it)."""
        return max(0.0, self.cpu_s.get("gateway", 0.0) - self.tracker_cpu_s)

    @property
    def chunks_per_cpu_s(self) -> dict[str, float]:
        """Chunks per CPU-second of each stage process, of the tracker and of the rest of the
        gateway."""
        seconds = {name: self.cpu_s.get(name, 0.0) for name in PROCESSES}
        seconds["tracker"] = self.tracker_cpu_s
        seconds["gateway"] = self.gateway_without_tracker_cpu_s
        return {name: self.chunks / s for name, s in seconds.items() if s > 0}


def zerocost(
    broker: BrokerHandle,
    root: Path,
    docs: list[Document],
    *,
    repeat: int,
    clients: int,
    deadline_s: float,
) -> ZeroCost:
    """Start Sluice with the zero-cost embed stage, upload `docs` `repeat` times (each copy in
    its own collection, so nothing is a duplicate), wait until all are indexed, then replay
    the job events through a fresh tracker."""
    pipeline = launch(
        broker,
        root / "pipeline",
        dict(DEFAULTS),
        commands={"embed": [sys.executable, "-m", "bench.passthrough", "embed"]},
    )
    try:
        meter = CpuMeter(pids(pipeline)).start()
        figures, jobs, events = asyncio.run(_drive(pipeline, docs, repeat, clients, deadline_s))
        cpu_s = meter.stop()
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)
    settings = pipeline.settings()
    # A fresh store under a data dir of its own, but the pipeline's message secret: the
    # tracker checks every event's signature.
    replay = settings.model_copy(
        update={"data_dir": root / "replay", "message_secret": message_secret(settings)}
    )
    tracker_cpu_s = asyncio.run(_replay(replay, jobs, events))
    return ZeroCost(
        **figures,
        repeat=repeat,
        cpu_s=cpu_s,
        event_deliveries=len(events),
        tracker_cpu_s=tracker_cpu_s,
    )


async def _drive(
    pipeline: Pipeline, docs: list[Document], repeat: int, clients: int, deadline_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]], list[RecordedDelivery]]:
    """Upload every copy, wait for every job, and record every job event on the way."""
    events: list[RecordedDelivery] = []
    broker = Broker(pipeline.settings())
    await broker.connect()
    try:
        channel = await broker.consumer_channel(prefetch=1000)
        exchange = await channel.get_exchange(routing.exchange(pipeline.namespace))
        # Bound like the tracker's own queue, so it gets a copy of every event the tracker does.
        recorder = await channel.declare_queue(exclusive=True)
        await recorder.bind(exchange, routing.JOB_EVENTS)

        async def record(delivery: AbstractIncomingMessage) -> None:
            events.append(
                RecordedDelivery(
                    body=delivery.body,
                    headers=dict(delivery.headers),
                    routing_key=delivery.routing_key,
                    message_id=delivery.message_id,
                )
            )

        await recorder.consume(record, no_ack=True)
        collections = [f"zerocost-{n}" for n in range(repeat)]
        started = datetime.now(UTC)
        for collection in collections:
            answers = await upload_all(pipeline.url, collection, docs, clients)
            if refused := [a for a in answers if a.status != 202]:
                raise RuntimeError(f"{len(refused)} uploads refused, first: {refused[0]}")
        jobs = [
            job
            for collection in collections
            for job in await wait_until_done(pipeline.url, collection, len(docs), deadline_s)
        ]
        ends = [end for job in jobs if (end := finished_at(job, "index")) is not None]
        wall_s = ((max(ends) if ends else datetime.now(UTC)) - started).total_seconds()
        # The tracker folded the last events before the jobs read as ended; our copies of them
        # may still be on their way.
        seen = -1
        while seen != len(events):
            seen = len(events)
            await asyncio.sleep(QUIET_S)
    finally:
        await broker.close()
    figures = {
        "documents": len(jobs),
        "chunks": sum(j["progress"]["chunks_total"] or 0 for j in jobs),
        "failed": sum(j["status"] == "failed" for j in jobs),
        "wall_s": wall_s,
    }
    return figures, jobs, events


async def _replay(
    settings: Settings, jobs: list[dict[str, Any]], events: list[RecordedDelivery]
) -> float:
    """CPU seconds a fresh tracker takes to fold `events` into a fresh store holding `jobs` as
    the gateway created them, at most `PREFETCH` deliveries at a time (as many as it holds)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_job_store(settings)
    for job in jobs:
        store.create(
            NewJob(
                job_id=job["job_id"],
                document_id=job["document_id"],
                collection=job["collection"],
                filename=job["filename"],
                content_type=job["content_type"],
                size_bytes=job["size_bytes"],
                blob_sha256=job["blob_sha256"],
            )
        )
        store.confirm(job["job_id"])
    # Not connected: folding only reads the broker's settings and message signer.
    tracker = Tracker(Broker(settings), store, JobChanges())
    deliveries = cast(list[AbstractIncomingMessage], events)
    started = time.process_time()
    for first in range(0, len(deliveries), PREFETCH):
        # The tracker's own fold: parse, verify, apply in one transaction, notify, ack.
        await tracker._fold(deliveries[first : first + PREFETCH])
    spent = time.process_time() - started
    # The replay must have ended every job as the pipeline did, or events were not folded.
    ended = {status: n for status, n in store.count_by_status().items() if n}
    if ended != dict(Counter(job["status"] for job in jobs)):
        raise RuntimeError(f"the replayed tracker left the jobs {ended}, not as the run did")
    return spent
