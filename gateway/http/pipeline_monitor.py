"""The gateway's view of the running pipeline: every worker's heartbeats, and each stage lane's
queue sampled every few seconds, for `GET /v1/pipeline` and `sluice status`.

Every gateway hears every worker: it binds a queue of its own (auto-delete, short message
TTL, so a heartbeat nobody read in time is dropped rather than mistaken for news) to
`worker.#`. The queues are sampled with passive declares on a channel of their own, so a
queue that went missing closes only that channel, never the publishing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from aiormq.exceptions import AMQPError
from pydantic import ValidationError

from contracts import routing
from contracts.events import WorkerHeartbeat
from contracts.settings import Settings
from contracts.topology import QueueArguments
from gateway.http.pipeline_health import PipelineHealth, utc_now
from gateway.http.pipeline_schemas import PipelineOut
from stages.infra.broker import Broker

log = logging.getLogger(__name__)

# How often each stage lane's queue is sampled.
SAMPLE_EVERY_S = 2.0
# A passive declare that takes longer than this counts as the broker being away.
SAMPLE_TIMEOUT_S = 5.0
# Heartbeats waiting in the gateway's queue beyond a few periods are old news.
_TTL_PERIODS = 2
_MIN_TTL_S = 2.0
# Bounds the queue if the gateway stops reading without its connection dropping.
_MAX_WAITING_HEARTBEATS = 10_000


def new_gateway_id() -> str:
    """`<host>-<pid>-<random>`: names this gateway's heartbeat queue, unique per process."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40] or 'gateway'}-{os.getpid()}-{secrets.token_hex(3)}"


class PipelineMonitor:
    """Hears heartbeats and samples queues in the background; `snapshot()` answers at once."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        *,
        gateway_id: str | None = None,
        sample_every_s: float = SAMPLE_EVERY_S,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.gateway_id = gateway_id or new_gateway_id()
        self.sample_every_s = sample_every_s
        pipeline = settings.pipeline
        self.health = PipelineHealth(
            (s.name for s in pipeline.stages),
            (s.name for s in pipeline.side),
            started_at=utc_now(),
        )
        self._sampler: asyncio.Task[None] | None = None
        self._heartbeats: AbstractRobustChannel | None = None
        self._probe: AbstractRobustChannel | None = None
        # The last moment the broker was known to be reachable: health is judged as of then
        # while it is away, so silence the gateway cannot hear is not taken for dead workers.
        self._reachable_at: float | None = None

    @property
    def queue_name(self) -> str:
        """This gateway's heartbeat queue."""
        return routing.heartbeat_queue(self.settings.namespace, self.gateway_id)

    async def start(self) -> None:
        """Start listening and sampling in the background (after `broker.connect`); never
        raises, so a monitor in trouble cannot hold up the rest of the gateway."""
        self._sampler = asyncio.create_task(self._run(), name="pipeline-monitor")

    async def listen(self) -> None:
        """Declare and bind this gateway's heartbeat queue, and consume it."""
        ttl_s = max(_MIN_TTL_S, _TTL_PERIODS * self.settings.heartbeat_every_s)
        arguments: dict[str, Any] = QueueArguments(
            queue_type="classic",
            message_ttl_ms=int(ttl_s * 1000),
            max_length=_MAX_WAITING_HEARTBEATS,
            overflow="drop-head",
        ).as_amqp()
        channel = await self.broker.connection.channel()
        try:
            # Robust: after a reconnect the queue (deleted with the old connection) is
            # declared, bound and consumed again by aio-pika.
            exchange = await channel.declare_exchange(
                routing.exchange(self.settings.namespace), "topic", durable=True
            )
            queue = await channel.declare_queue(
                self.queue_name, durable=False, auto_delete=True, arguments=arguments
            )
            await queue.bind(exchange, routing_key=routing.WORKER_HEARTBEATS)
            # No acks: a heartbeat lost is replaced by the next one in a few seconds.
            await queue.consume(self._on_heartbeat, no_ack=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        self._heartbeats = channel
        self._reachable_at = time.monotonic()

    async def stop(self) -> None:
        """Stop sampling and listening; the heartbeat queue goes with its consumer."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for channel in (self._probe, self._heartbeats):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(AMQPError, RuntimeError, ConnectionError):
                    await channel.close()

    @property
    def stale(self) -> bool:
        """Whether the broker is away now (or never was reached): the numbers are old."""
        return self._reachable_at is None or not self.broker.is_connected

    def snapshot(self, visible_jobs: set[str] | None = None) -> PipelineOut:
        """What the gateway knows now; while the broker is away, as of when it was last up."""
        now = time.monotonic()
        stale = self.stale
        if stale and self._reachable_at is not None:
            now = self._reachable_at
        return self.health.snapshot(
            now, stale=stale, gateway_id=self.gateway_id, visible_jobs=visible_jobs
        )

    def in_hand_jobs(self) -> set[str]:
        """Every job a known worker holds (for filtering by the caller's collections)."""
        return self.health.in_hand_jobs()

    async def _on_heartbeat(self, delivery: AbstractIncomingMessage) -> None:
        # Signed for their own routing key (`worker.<stage>`), which they keep here.
        if not self.broker.signer.verify_headers(
            delivery.routing_key or "", delivery.body, delivery.headers
        ):
            log.warning(
                "dropping a worker heartbeat (%r) not signed with this deployment's message "
                "secret; if a Sluice process sent it, give every process the same "
                "SLUICE_MESSAGE_SECRET",
                delivery.routing_key,
            )
            return
        try:
            beat = WorkerHeartbeat.model_validate_json(delivery.body)
        except ValidationError as exc:
            log.warning("dropping an invalid worker heartbeat %r: %s", delivery.body[:200], exc)
            return
        now = time.monotonic()
        self._reachable_at = now
        self.health.hear(beat, now, utc_now())

    async def _run(self) -> None:
        while self._heartbeats is None:
            try:
                await self.listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot listen for worker heartbeats yet: %r", exc)
                await asyncio.sleep(self.sample_every_s)
        while True:
            try:
                await asyncio.wait_for(self.sample(), SAMPLE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The broker is away or a queue is missing: keep what was known, try again.
                log.debug("pipeline sample failed: %r", exc)
                await self._drop_probe()
            await asyncio.sleep(self.sample_every_s)

    async def sample(self) -> None:
        """Sample every stage lane's ready and consumer counts once."""
        if not self.broker.is_connected:
            return
        if self._probe is None or self._probe.is_closed:
            self._probe = await self.broker.connection.channel()
        ns = self.settings.namespace
        for stage in self.health.stage_names:
            ready: dict[str, int] = {}
            consumers: dict[str, int] = {}
            for lane in routing.LANES:
                # Not robust: a robust channel answers a passive declare of a queue it
                # declared before from its cache, never asking the broker again.
                queue = await self._probe.declare_queue(
                    routing.stage_queue(ns, stage, lane), passive=True, robust=False
                )
                result = queue.declaration_result
                ready[lane] = result.message_count or 0
                consumers[lane] = result.consumer_count or 0
            now = time.monotonic()
            self.health.record(stage, ready, consumers, now, utc_now())
        self._reachable_at = time.monotonic()
        self.health.prune(self._reachable_at)

    async def _drop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and not probe.is_closed:
            with contextlib.suppress(Exception):
                await probe.close()
