"""Handing finished jobs' webhooks to the webhook stage.

When a job with a callback URL ends, the job store marks its webhook pending (in the same
write that ends the job, so no end is ever lost). Every gateway runs a dispatcher: it claims
due webhooks with a lease (one gateway at a time takes each), publishes a `WebhookRequest`
with confirms to `notify.webhook` and marks it published. A gateway that dies in between
leaves the claim to lapse and another one publishes it: receivers dedupe on
`X-Sluice-Delivery`, which is the same for every copy of one end of one job.
"""

from __future__ import annotations

import asyncio
import logging

from contracts import routing
from contracts.errors import Transient
from contracts.messages import WebhookRequest
from gateway.http.schemas import Job
from gateway.http.services import Services

log = logging.getLogger(__name__)

# Webhooks claimed at a time; the rest wait for the next round.
_BATCH = 50


def delivery_id(job: Job) -> str:
    """The id of one end of one job: a retried job that ends again is a new delivery."""
    round_ = job.webhook.round if job.webhook is not None else 1
    return f"{job.job_id}.{round_}"


def webhook_request(job: Job, callback_url: str) -> WebhookRequest:
    """The message the webhook stage POSTs: the job JSON as `GET /v1/jobs/{id}` answers it."""
    return WebhookRequest(
        job_id=job.job_id,
        document_id=job.document_id,
        collection=job.collection,
        filename=job.filename,
        priority=job.priority,
        callback_url=callback_url,
        job=job.model_dump(mode="json"),
        delivery_id=delivery_id(job),
    )


class WebhookDispatcher:
    """Every `every_s`, publishes the webhooks of jobs that ended."""

    def __init__(self, services: Services, every_s: float = 0.5) -> None:
        self.services = services
        self.every_s = every_s
        # Longer than a round of publishes may take (each times out), so a claim outlives it.
        self.lease_s = max(30.0, 4 * services.broker.publish_timeout_s)

    async def run(self) -> None:
        """Until cancelled: claim, publish, mark published."""
        while True:
            try:
                await self.once()
            except Exception:
                # A store or broker hiccup: the claims lapse and a later round tries again.
                log.exception("dispatching webhooks failed; retrying shortly")
            await asyncio.sleep(self.every_s)

    async def once(self) -> int:
        """One round; returns how many webhooks were published."""
        if not self.services.broker.is_connected:
            return 0
        store = self.services.store
        due = await asyncio.to_thread(store.claim_webhooks, self.lease_s, _BATCH)
        published = 0
        for job, callback_url in due:
            try:
                await self.services.broker.publish(
                    webhook_request(job, callback_url), routing.WEBHOOK
                )
            except Transient as exc:
                # Refused (the webhook queue is full) or unconfirmed: the lease lapses and a
                # later round, here or in another gateway, publishes it again.
                log.warning("job %s: could not hand its webhook on yet (%s)", job.job_id, exc)
                continue
            await asyncio.to_thread(store.webhook_published, job.job_id)
            published += 1
        return published
