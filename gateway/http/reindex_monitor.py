"""Moving reindexes on: sending their documents through chunk → embed → index into the new
generation, counting them, switching, and dropping the generation each one made obsolete.

Every gateway runs a monitor; each round (every `every_s`, and at once when a reindex started
or a job ended: `Services.reindexes`), for each reindex the store says to watch:

- an active one gets jobs for the documents it still lacks, as many as its share of the bulk
  lane has room for (half of `SLUICE_BULK_IN_FLIGHT`, split between the reindexes under
  way; the other half stays for bulk uploads), each a `DocumentParsed` of the
  document's newest indexed version (its stored parsed text: nothing is parsed again) in the
  bulk lane; documents uploaded or replaced meanwhile are caught up the same way. Then the
  store counts it and, once every document is in and no upload of the collection is in
  flight, switches the collection to the new generation in one transaction. On a collection
  that always has an upload in flight it waits `switch_wait_s` in `switching`, then switches
  anyway: the uploads still in flight end in the old generation and are caught up into the
  new one as stragglers (below). The monitor drops
  the old generation from the index `drop_after_s` later (a search that read the serving
  generation just before the switch still finds its chunks, then asks the new one).
- a done one is watched a while longer (`straggler_window_s`): an upload that still ended
  in the old generation (one another gateway admitted in the instant of the switch, or a
  dead letter replayed) is caught up into the serving one, and the old generation, which
  its late write made anew, is dropped again.
- a cancelled or failed one has its generation dropped once its jobs still in the queues
  ended (their writes would otherwise make it anew), or once the window passed.

The store's transactions make this safe to run on several gateways at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from contracts.errors import Transient
from contracts.generations import index_name
from contracts.messages import DocumentParsed
from contracts.routing import BULK
from gateway.http.services import Services
from gateway.store.reindex_base import Reindex, ReindexJob
from stages.infra.broker import PublishRejected

log = logging.getLogger(__name__)


class ReindexMonitor:
    """Every `every_s` (or when rung), moves every watched reindex on."""

    def __init__(self, services: Services, every_s: float = 0.5, drop_after_s: float = 5.0) -> None:
        self.services = services
        self.every_s = every_s
        # How long the old generation outlives the switch: a search that read the serving
        # generation just before it still finds its chunks (and then asks again).
        self.drop_after_s = drop_after_s
        settings = services.settings
        self.room = settings.bulk_in_flight
        self.straggler_window_s = max(60.0, settings.stalled_after_s)
        # How long a reindex waits in `switching` for the collection's uploads to end; half
        # the straggler window, so the ones it switches past are still caught up.
        self.switch_wait_s = self.straggler_window_s / 2
        # When each reindex this gateway tends began `switching` (monotonic seconds).
        self._switching_since: dict[str, float] = {}
        self.republish_after_s = settings.republish_after_s
        self.lease_s = max(settings.republish_after_s, 2 * services.broker.publish_timeout_s)

    async def run(self) -> None:
        """Until cancelled: wait for a ring or the next round, then move reindexes on."""
        rung = self.services.reindexes
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rung.wait(), self.every_s)
            rung.clear()
            try:
                await self.once()
            except Exception:
                # A store, broker or index hiccup: the next round does what this one did not.
                log.exception("moving reindexes on failed; retrying shortly")

    async def once(self) -> None:
        """One round over every watched reindex."""
        if not self.services.broker.is_connected:
            return
        store = self.services.store
        watched = await asyncio.to_thread(store.reindexes_to_watch, self.straggler_window_s)
        # Reindexes share half the bulk lane: the other half stays for bulk uploads, which
        # the admitter lets in fairly (a reindex's jobs in flight count in the lane).
        active = sum(1 for r in watched if r.active)
        self.room = max(1, self.services.settings.bulk_in_flight // 2 // max(1, active))
        for reindex in watched:
            await self.tend(reindex)

    async def tend(self, reindex: Reindex) -> None:
        """Move one reindex on as far as it goes now."""
        store = self.services.store
        if reindex.active or reindex.state == "done":
            jobs = await asyncio.to_thread(store.add_reindex_jobs, reindex.reindex_id, self.room)
            jobs += await asyncio.to_thread(
                store.unconfirmed_reindex_jobs,
                reindex.reindex_id,
                self.republish_after_s,
                self.lease_s,
            )
            for job in jobs:
                await self._publish(job)
            if reindex.state == "done":
                await self._drop_stale(reindex, jobs)
        if reindex.active:
            after = await asyncio.to_thread(store.advance_reindex, reindex.reindex_id)
            if after is not None and after.state == "switching" and self._waited_out(after):
                after = await asyncio.to_thread(
                    store.advance_reindex, reindex.reindex_id, force=True
                )
            if after is None or after.active:
                return
            self._switching_since.pop(reindex.reindex_id, None)
            reindex = after
            log.info(
                "reindex %s of %s ended %s (generation %d)",
                reindex.reindex_id,
                reindex.collection,
                reindex.state,
                reindex.generation,
            )
            return
        if reindex.dropped:
            return
        if reindex.state == "done":
            if _age_s(reindex) >= self.drop_after_s:
                await self._drop(reindex, reindex.from_generation)
            return
        # Cancelled or failed: its generation goes once nothing of it still writes there.
        in_flight = await asyncio.to_thread(store.reindex_in_flight, reindex.reindex_id)
        if in_flight == 0 or _age_s(reindex) > self.straggler_window_s:
            await self._drop(reindex, reindex.generation)

    def _waited_out(self, reindex: Reindex) -> bool:
        """Whether `reindex` has waited `switch_wait_s` in `switching` for uploads to end."""
        since = self._switching_since.setdefault(reindex.reindex_id, time.monotonic())
        return time.monotonic() - since >= self.switch_wait_s

    async def _drop(self, reindex: Reindex, generation: int) -> None:
        name = index_name(reindex.collection, generation)
        await asyncio.to_thread(self.services.index.drop_collection, name)
        await asyncio.to_thread(self.services.store.mark_dropped, reindex.reindex_id)
        log.info("reindex %s: dropped %s from the index", reindex.reindex_id, name)

    async def _drop_stale(self, reindex: Reindex, jobs: list[ReindexJob]) -> None:
        """Drop again the old generations the caught-up uploads wrote to after the switch."""
        for generation in {j.source_generation for j in jobs} - {reindex.generation}:
            name = index_name(reindex.collection, generation)
            await asyncio.to_thread(self.services.index.drop_collection, name)
            log.info("reindex %s: an upload ended in %s after the switch", reindex.reindex_id, name)

    async def _publish(self, job: ReindexJob) -> None:
        """Send a reindex job's parsed text to the chunk stage; one not sent stays unconfirmed
        and goes out again once its lease ran out."""
        pipeline = self.services.settings.pipeline
        key = pipeline.output_key(pipeline.first.name)
        message = DocumentParsed(
            job_id=job.job_id,
            document_id=job.document_id,
            collection=job.collection,
            filename=job.filename,
            priority=BULK,
            generation=job.generation,
            profile=job.profile,
            blob_sha256=job.blob_sha256,
            parsed_sha256=job.parsed_sha256,
            pages=job.pages,
        )
        try:
            await self.services.broker.publish(message, key)
        except (PublishRejected, Transient) as exc:
            log.warning("reindex job %s not published yet: %s", job.job_id, exc)
            return
        await asyncio.to_thread(self.services.store.confirm, job.job_id)


def _age_s(reindex: Reindex) -> float:
    """Seconds since the reindex ended."""
    finished = reindex.finished_at or datetime.now(UTC)
    return (datetime.now(UTC) - finished).total_seconds()
