"""The reindex monitor's wait in `switching`: on a collection that always has an upload in
flight it switches anyway once it waited `switch_wait_s` (the uploads are caught up after),
instead of waiting for ever. The store is a test double that records what was asked."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from contracts.messages import IndexProfile
from contracts.settings import Settings
from gateway.http.reindex_monitor import ReindexMonitor
from gateway.store.reindex_base import Reindex

SWITCHING = Reindex(
    reindex_id="r1",
    collection="books",
    generation=1,
    from_generation=0,
    profile=IndexProfile(chunk_max_tokens=128),
    state="switching",
    created_at=datetime.now(UTC),
    finished_at=None,
    documents_total=2,
    documents_done=2,
    documents_failed=0,
    dropped=False,
)


class BusyStore:
    """A store double whose collection always has an upload in flight: `advance_reindex`
    answers `switching` unless forced."""

    def __init__(self) -> None:
        self.forced = 0

    def add_reindex_jobs(self, reindex_id: str, room: int) -> list[Any]:
        return []

    def unconfirmed_reindex_jobs(self, *args: object) -> list[Any]:
        return []

    def advance_reindex(self, reindex_id: str, *, force: bool = False) -> Reindex:
        if force:
            self.forced += 1
            return replace(SWITCHING, state="done", finished_at=datetime.now(UTC))
        return SWITCHING


def monitor(store: BusyStore, switch_wait_s: float) -> ReindexMonitor:
    services: Any = SimpleNamespace(
        settings=Settings(), store=store, broker=SimpleNamespace(publish_timeout_s=5.0)
    )
    watching = ReindexMonitor(services)
    watching.switch_wait_s = switch_wait_s
    return watching


async def test_switching_waits_for_uploads_while_the_wait_lasts() -> None:
    store = BusyStore()
    watching = monitor(store, switch_wait_s=3600)
    for _ in range(3):
        await watching.tend(SWITCHING)
    assert store.forced == 0


async def test_switching_goes_ahead_once_the_wait_ran_out() -> None:
    store = BusyStore()
    watching = monitor(store, switch_wait_s=0)
    await watching.tend(SWITCHING)
    assert store.forced == 1
