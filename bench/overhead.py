"""Pipeline overhead: Sluice's runtime moving messages with no work to do, against a plain
aio-pika chain of four pass-through consumers moving the same messages.

Both sides get the corpus's data-plane messages `repeat` times over (enough for a steady
rate), published straight onto the first queue, and are timed from the first publish to the
last message done. Sluice runs its four stage processes (bench/passthrough.py: the real runtime
and embed handler, a zero-cost embedder, parse/chunk answering recorded outputs, index writing
nothing) with the gateway's tracker folding their job events, as in production.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage
from broker import BrokerHandle
from pipeline import Pipeline, launch, stop_pipeline

from bench.cpu import CpuMeter
from bench.memory import queue_info
from bench.pika_chain import PlainRun, plain_chain
from bench.prepare import Plan, Prepared
from bench.sluice_run import DEFAULTS, keep_logs, pids
from contracts import routing
from contracts.events import events_of
from contracts.messages import DocumentUploaded
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from stages.infra.broker import Broker

# Seconds the management API's message counts lag behind (its stats interval is 5 s).
STATS_LAG_S = 6.0


@dataclass(frozen=True)
class Overhead:
    """The same data-plane messages through Sluice's runtime and through the plain chain."""

    messages: int
    sluice_s: float
    # Job-event messages the broker carried for Sluice's run (a message may hold several).
    event_messages: int
    # CPU seconds per process (and the rest of the machine), first publish to last batch.
    sluice_cpu_s: dict[str, float]
    plain: PlainRun

    @property
    def sluice_messages_per_s(self) -> float:
        """Data-plane messages (upload, parsed, chunk and embedded batches) per second."""
        return self.messages / self.sluice_s

    @property
    def broker_messages_per_data_message(self) -> float:
        """Everything Sluice's run published (data and event messages) per data message;
        the plain chain's is 1."""
        return (self.messages + self.event_messages) / self.messages

    @property
    def ratio(self) -> float:
        """Sluice's message rate as a fraction of the plain chain's."""
        return self.sluice_messages_per_s / self.plain.messages_per_s


def overhead(
    broker: BrokerHandle, root: Path, prepared: Prepared, *, repeat: int, deadline_s: float
) -> Overhead:
    """Run `repeat` copies of the corpus's messages through Sluice, then the plain chain."""
    recording = root / "recording.json"
    root.mkdir(parents=True, exist_ok=True)
    prepared.recording.dump(recording)
    passthrough = [sys.executable, "-m", "bench.passthrough"]
    pipeline = launch(
        broker,
        root / "sluice",
        {**DEFAULTS, "BENCH_RECORDING": str(recording)},
        commands={stage: [*passthrough, stage] for stage in STAGES},
    )
    names = list(prepared.recording.parsed)
    uploads = [
        _uploaded(name, plan.uploaded)
        for _ in range(repeat)
        for name, plan in zip(names, prepared.plans, strict=True)
    ]
    batches = repeat * sum(len(p.embedded_batches) for p in prepared.plans)
    try:
        meter = CpuMeter(pids(pipeline)).start()
        sluice_s, event_messages = asyncio.run(
            _through_sluice(pipeline, broker, uploads, batches, deadline_s)
        )
        sluice_cpu_s = meter.stop()
    except BaseException:
        keep_logs(pipeline)
        raise
    finally:
        stop_pipeline(pipeline)
    plans: list[Plan] = prepared.plans * repeat
    messages = sum(p.messages for p in plans)
    print(f"  Sluice: {event_messages} job-event messages beside {messages} data messages")
    plain = plain_chain(broker.amqp_url, plans, deadline_s)
    return Overhead(
        messages=messages,
        sluice_s=sluice_s,
        event_messages=event_messages,
        sluice_cpu_s=sluice_cpu_s,
        plain=plain,
    )


def _uploaded(filename: str, size: int) -> DocumentUploaded:
    return DocumentUploaded(
        job_id=uuid.uuid4().hex,
        document_id=uuid.uuid4().hex,
        collection="overhead",
        filename=filename,
        blob_sha256="0" * 64,
        content_type="application/octet-stream",
        size_bytes=max(size, 1),
    )


async def _through_sluice(
    pipeline: Pipeline,
    broker_handle: BrokerHandle,
    uploads: list[DocumentUploaded],
    batches: int,
    deadline_s: float,
) -> tuple[float, int]:
    """Publish every upload as the gateway does; wait for index's event for every batch.
    Returns the seconds that took and the job-event messages the tracker's queue took in."""
    tracker_queue = routing.tracker_queue(pipeline.namespace)
    before = _published_into(broker_handle, tracker_queue)
    broker = Broker(pipeline.settings())
    await broker.connect()
    try:
        channel = await broker.consumer_channel(prefetch=1000)
        exchange = await channel.get_exchange(routing.exchange(pipeline.namespace))
        # A copy of index's progress events, beside the tracker's: they count the batches
        # indexed (a message may carry several).
        watch = await channel.declare_queue(exclusive=True)
        await watch.bind(exchange, routing.job_event_key("index", "progress"))
        indexed = 0
        done = asyncio.Event()

        async def count(delivery: AbstractIncomingMessage) -> None:
            nonlocal indexed
            indexed += len(events_of(delivery.body))
            if indexed >= batches:
                done.set()

        await watch.consume(count, no_ack=True)
        started = time.monotonic()
        await asyncio.gather(*(broker.publish(m, routing.DOC_UPLOADED) for m in uploads))
        await asyncio.wait_for(done.wait(), deadline_s)
        took = time.monotonic() - started
    finally:
        await broker.close()
    # The management API's message counts are a few seconds behind.
    await asyncio.sleep(STATS_LAG_S)
    return took, _published_into(broker_handle, tracker_queue) - before


def _published_into(broker: BrokerHandle, queue: str) -> int:
    """Messages ever routed into `queue`, as the management API counts them."""
    return int((queue_info(broker, queue).get("message_stats") or {}).get("publish", 0))
