"""The tracker: folds `job.*` events from every stage into the job store."""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts import routing
from contracts.events import JobEvent
from gateway.jobs import JobStore
from gateway.services import JobChanges
from stages.broker import Broker, declare_queue
from stages.logs import log_context

log = logging.getLogger(__name__)


class Tracker:
    """Consumes the tracker queue; the only writer of job progress."""

    def __init__(self, broker: Broker, store: JobStore, changes: JobChanges) -> None:
        self.broker = broker
        self.store = store
        self.changes = changes

    async def start(self) -> None:
        """Start consuming; the robust channel resumes by itself after a reconnect."""
        channel = await self.broker.consumer_channel(prefetch=256)
        name = routing.tracker_queue(self.broker.settings.namespace)
        queue = await declare_queue(channel, self.broker.topology, name)
        await queue.consume(self._on_event)

    async def _on_event(self, delivery: AbstractIncomingMessage) -> None:
        try:
            event = JobEvent.model_validate_json(delivery.body)
        except ValidationError as exc:
            # A malformed status event cannot be applied and must not block the ones behind it.
            log.error("dropping an invalid job event %r: %s", delivery.body[:200], exc)
            await delivery.ack()
            return
        with log_context(job_id=event.job_id, document_id=event.document_id, stage=event.stage):
            if event.kind == "failed" and event.error:
                log.warning("job failed in %s: %s", event.stage, event.error.message)
            if self.store.apply(event):
                self.changes.notify(event.job_id)
        await delivery.ack()
