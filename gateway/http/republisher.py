"""Publishing again what a dead gateway recorded but never got confirmed.

A gateway records a job before it publishes the job's `doc.uploaded` and confirms it after
the broker's confirm. If it dies in between (OOM kill, node loss), the job would wait
`queued` forever. Every gateway runs a republisher: it claims such jobs from the shared job
store with a lease (so one gateway at a time takes each), publishes them again and confirms
them. Stages are idempotent, so a job published twice costs work, never correctness.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.http.services import Services
from gateway.http.uploads import publish_and_confirm

log = logging.getLogger(__name__)

# Jobs claimed at a time; the rest wait for the next round.
_BATCH = 50


class Republisher:
    """Every `every_s`, republishes jobs left unconfirmed for `republish_after_s`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        after_s = services.settings.republish_after_s
        self.older_than_s = after_s
        self.every_s = max(0.5, after_s / 2)
        # Longer than a publish may take (it times out), so a claim outlives its attempt.
        self.lease_s = max(after_s, 2 * services.broker.publish_timeout_s)

    async def run(self) -> None:
        """Until cancelled: claim, publish, confirm."""
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.once()
            except Exception:
                # A store or broker hiccup: the claims lapse and the next round tries again.
                log.exception("republishing unconfirmed jobs failed; retrying later")

    async def once(self) -> int:
        """One round; returns how many jobs were published again."""
        if not self.services.broker.is_connected:
            return 0
        store = self.services.store
        jobs = await asyncio.to_thread(
            store.claim_unconfirmed, self.older_than_s, self.lease_s, _BATCH
        )
        done = 0
        for job in jobs:
            if await publish_and_confirm(self.services, job, "recorded, never confirmed"):
                log.info("job %s was recorded but never confirmed: published again", job.job_id)
                done += 1
        return done
