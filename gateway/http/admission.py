"""Letting held jobs into the pipeline, fairly between collections.

Why the backlog waits in the job store and not in the broker: broker queues are FIFO, so a
collection that uploads 10,000 documents first would hold every other collection's work
behind them. Bulk uploads (and interactive ones past their collection's cap) are recorded
*held*; every gateway runs an admitter that, each round, claims what the lanes have room for
(`JobStore.claim_admissions`: the collection with the fewest in flight first, oldest job
first within it, atomic across gateways), publishes each job's `doc.uploaded` in its lane
and confirms it. A round runs every `every_s`, and at once when an upload was held or a job
ended (`Services.admissions`).

A gateway that dies between the claim and the confirm leaves an admitted, unconfirmed job:
the republisher (gateway/http/republisher.py) publishes it again once the claim's lease ran
out, exactly as for an upload its gateway died in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.http.services import Services
from gateway.http.uploads import publish_and_confirm

log = logging.getLogger(__name__)

# Jobs admitted at most per round; a full round is followed by another at once.
_BATCH = 64


class Admitter:
    """Every `every_s` (or when rung), admits the held jobs the lanes have room for."""

    def __init__(self, services: Services, every_s: float = 0.5) -> None:
        self.services = services
        self.every_s = every_s
        # As long as the republisher's, so it never takes a job this admitter is publishing.
        self.lease_s = max(
            services.settings.republish_after_s, 2 * services.broker.publish_timeout_s
        )

    async def run(self) -> None:
        """Until cancelled: wait for a ring or the next round, then admit."""
        rung = self.services.admissions
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rung.wait(), self.every_s)
            rung.clear()
            try:
                while await self.once() == _BATCH:
                    pass  # a full batch: more may have room
            except Exception:
                # A store or broker hiccup: the claims lapse and a later round tries again.
                log.exception("admitting held jobs failed; retrying shortly")

    async def once(self) -> int:
        """One round; returns how many jobs were admitted."""
        if not self.services.broker.is_connected:
            return 0
        store = self.services.store
        jobs = await asyncio.to_thread(store.claim_admissions, self.lease_s, _BATCH)
        for job in jobs:
            # In the order admitted: that is the order they take their places in line. One
            # not published keeps its turn and its slot; the republisher sends it later.
            if await publish_and_confirm(self.services, job, "admitted"):
                log.debug("job %s (%s, %s) admitted", job.job_id, job.priority, job.collection)
        return len(jobs)
