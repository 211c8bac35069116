"""The plain baseline for pipeline overhead: four aio-pika consumers that only pass messages on.

Each consumer takes from its queue and republishes what the matching Sluice stage would
(same counts and body sizes, from the corpus's plans) to the next queue with publisher
confirms, then acks; the last one only acks. Same queue type, prefetch, concurrency and
niceness as Sluice's stages, one process per consumer as Sluice runs them; no work, no job events.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bench.cpu import CpuMeter
from bench.prepare import Plan
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from contracts.settings import Settings

QUEUES = [f"bench.plain.{stage}" for stage in STAGES]


@dataclass(frozen=True)
class PlainRun:
    """Messages moved through the four queues and how long it took."""

    messages: int
    wall_s: float
    # CPU seconds per process (and the rest of the machine), first publish to last ack.
    cpu_s: dict[str, float]

    @property
    def messages_per_s(self) -> float:
        """Messages through the chain per second."""
        return self.messages / self.wall_s


def _outputs(step: int, plan: Plan, batch: int) -> list[tuple[int, int]]:
    """(batch, body size) of what consumer `step` republishes for one message of a document."""
    if step == 0:
        return [(0, plan.parsed)]
    if step == 1:
        return list(enumerate(plan.chunk_batches))
    if step == 2:
        return [(batch, plan.embedded_batches[batch])]
    return []


def _message(doc: int, batch: int, size: int) -> aio_pika.Message:
    return aio_pika.Message(
        b"x" * size,
        headers={"doc": doc, "batch": batch},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _declare(channel: AbstractChannel) -> None:
    for name in QUEUES:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def _consume(step: int, url: str, plans: list[Plan], ready: Event, done: Event) -> None:
    tuning = Settings().stage(STAGES[step])
    expected = sum(len(p.embedded_batches) for p in plans)
    seen = 0
    slots = asyncio.Semaphore(tuning.concurrency)
    connection = await aio_pika.connect(url)
    async with connection:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=tuning.prefetch)
        queue = await consumer.get_queue(QUEUES[step])

        async def on_message(delivery: AbstractIncomingMessage) -> None:
            nonlocal seen
            async with slots:
                headers = delivery.headers or {}
                doc, batch = int(str(headers["doc"])), int(str(headers["batch"]))
                outs = _outputs(step, plans[doc], batch)
                # Confirmed before the ack, as Sluice's runtime does.
                await asyncio.gather(
                    *(
                        publisher.default_exchange.publish(
                            _message(doc, b, size), routing_key=QUEUES[step + 1]
                        )
                        for b, size in outs
                    )
                )
                await delivery.ack()
                seen += 1
                if step == len(QUEUES) - 1 and seen == expected:
                    done.set()

        await queue.consume(on_message)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)


def _consumer_process(step: int, url: str, plans: list[Plan], ready: Event, done: Event) -> None:
    # The same scheduling priority as Sluice's stage processes.
    os.nice(Settings().stage_nice)
    asyncio.run(_consume(step, url, plans, ready, done))


async def _publish_all(url: str, plans: list[Plan]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(_message(d, 0, p.uploaded), routing_key=QUEUES[0])
                for d, p in enumerate(plans)
            )
        )


async def _setup(url: str, *, delete: bool) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        if delete:
            for name in QUEUES:
                await channel.queue_delete(name)
        else:
            await _declare(channel)


def plain_chain(url: str, plans: list[Plan], deadline_s: float) -> PlainRun:
    """Move every plan's messages through the four queues; time first publish to last ack."""
    asyncio.run(_setup(url, delete=False))
    spawn = multiprocessing.get_context("spawn")
    done = spawn.Event()
    readies = [spawn.Event() for _ in QUEUES]
    workers = [
        spawn.Process(target=_consumer_process, args=(i, url, plans, readies[i], done))
        for i in range(len(QUEUES))
    ]
    for worker in workers:
        worker.start()
    try:
        for ready in readies:
            if not ready.wait(60):
                raise TimeoutError("a plain consumer did not start within 60 s")
        meter = CpuMeter(
            {stage: worker.pid for stage, worker in zip(STAGES, workers, strict=True) if worker.pid}
        ).start()
        started = time.monotonic()
        asyncio.run(_publish_all(url, plans))
        if not done.wait(deadline_s):
            raise TimeoutError(f"the plain chain did not finish within {deadline_s:.0f} s")
        wall_s = time.monotonic() - started
        cpu_s = meter.stop()
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
        asyncio.run(_setup(url, delete=True))
    return PlainRun(messages=sum(p.messages for p in plans), wall_s=wall_s, cpu_s=cpu_s)
