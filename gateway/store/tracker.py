"""The tracker: folds `job.*` events from every stage into the job store; only events signed
with the deployment's message secret (contracts/message_signature.py), so no other publisher
on the broker can move a job or point its record at a blob."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError

from contracts import routing
from contracts.errors import Transient
from contracts.events import JobEvent, events_of
from contracts.message_signature import MessageSigner
from gateway.http.services import JobChanges
from gateway.store.base import JobStore
from stages.infra.broker import Broker, declare_queue
from stages.infra.logs import log_context

log = logging.getLogger(__name__)

# Events held unacked at once, and so the most folded into one store transaction.
PREFETCH = 256
# Waits before folding again while the job store is unavailable.
STORE_RETRY_S = (0.5, 1.0, 2.0, 5.0)


class Tracker:
    """Consumes the tracker queue; the only writer of job progress.

    Events that arrive while the store is writing wait and go into the next transaction
    together: one disk sync for many events keeps up with a busy pipeline, and the store is
    written from a worker thread so uploads on the event loop never wait for the disk.
    """

    def __init__(
        self,
        broker: Broker,
        store: JobStore,
        changes: JobChanges,
        on_job_end: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.store = store
        self.changes = changes
        # Called when a folded batch may have ended a job (a slot for a held job came free).
        self.on_job_end = on_job_end
        self._pending: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()
        self._folder: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start consuming; the robust channel resumes by itself after a reconnect."""
        self._folder = asyncio.create_task(self._fold_forever(), name="tracker")
        channel = await self.broker.consumer_channel(prefetch=PREFETCH)
        name = routing.tracker_queue(self.broker.settings.namespace)
        queue = await declare_queue(channel, self.broker.topology, name)
        await queue.consume(self._on_event)

    async def stop(self) -> None:
        """Stop folding; unacked events go back to the queue for the next gateway."""
        if self._folder is not None:
            self._folder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folder

    async def _on_event(self, delivery: AbstractIncomingMessage) -> None:
        self._pending.append(delivery)
        self._arrived.set()

    async def _fold_forever(self) -> None:
        failures = 0
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            deliveries, self._pending = self._pending, []
            try:
                await self._fold(deliveries)
                failures = 0
            except Transient as exc:
                # The store is briefly away (a PostgreSQL restart or failover): the events
                # stay unacked and are folded again, with what arrives meanwhile, once it is
                # back. Folding twice is harmless.
                delay = STORE_RETRY_S[min(failures, len(STORE_RETRY_S) - 1)]
                failures += 1
                log.warning(
                    "could not record %d job events, trying again in %.1f s: %s",
                    len(deliveries),
                    delay,
                    exc,
                )
                self._pending[:0] = deliveries
                await asyncio.sleep(delay)
                self._arrived.set()
            except Exception:
                # The events stay unacked and come back after a reconnect; the next ones
                # must still be folded.
                log.exception("could not record %d job events", len(deliveries))

    async def _fold(self, deliveries: list[AbstractIncomingMessage]) -> None:
        signer = self.broker.signer
        events = [e for delivery in deliveries for e in _parse(delivery, signer)]
        changed = await asyncio.to_thread(self.store.apply_all, events)
        if self.on_job_end is not None and _may_end(
            events, self.broker.settings.pipeline.last.name
        ):
            self.on_job_end()
        for event in events:
            if event.kind == "failed" and event.error:
                with log_context(
                    job_id=event.job_id, document_id=event.document_id, stage=event.stage
                ):
                    log.warning("job failed in %s: %s", event.stage, event.error.message)
        for job_id in changed:
            self.changes.notify(job_id)
        for delivery in deliveries:
            # Folding twice is harmless (progress counts units), so an ack lost with a closed
            # channel only means the event is folded again after redelivery.
            with contextlib.suppress(AMQPError, RuntimeError):
                await delivery.ack()


def _parse(delivery: AbstractIncomingMessage, signer: MessageSigner) -> list[JobEvent]:
    """The events of one message (one, or a stage's batch), or none if it is not to be
    trusted or read."""
    # Events are signed for their own routing key (`job.<stage>.<kind>`), which they keep here.
    key = delivery.routing_key or ""
    if not signer.verify_headers(key, delivery.body, delivery.headers):
        log.error(
            "dropping a job event (%r) not signed with this deployment's message secret; if a "
            "Sluice process sent it, give every process the same SLUICE_MESSAGE_SECRET",
            delivery.routing_key,
        )
        return []
    try:
        return events_of(delivery.body, key)
    except ValueError as exc:
        # A malformed status event cannot be applied and must not block the ones behind it.
        log.error("dropping an invalid job event %r: %s", delivery.body[:200], exc)
        return []


def _may_end(events: list[JobEvent], last_stage: str) -> bool:
    """Whether folding these may have ended a job: a failure, or the last stage's progress."""
    return any(e.kind == "failed" or e.stage == last_stage for e in events)
