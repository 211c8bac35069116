"""The PostgreSQL job store's re-indexing part: the shared queries (reindex_queries.py), each
in one transaction; the reindex's row is locked first, so gateways sharing the database take
turns on one reindex, and starts of one collection take turns under an advisory lock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from contracts.messages import IndexProfile
from gateway.store.pg_job_db import Cursor, JobDatabase
from gateway.store.reindex_base import Reindex, ReindexJob, Serving
from gateway.store.reindex_queries import POSTGRES, Execute, ReindexQueries, Rows

_QUERIES = ReindexQueries(POSTGRES)


def _execute(cur: Cursor) -> Execute:
    def run(sql: str, params: Mapping[str, object]) -> Rows:
        return cur.execute(sql, dict(params))

    return run


class PgReindexes:
    """Re-indexing records in the store's database; mixed into `PgJobStore`."""

    _db: JobDatabase
    _clock: Callable[[], datetime] | None

    def _now(self) -> datetime | None:
        # None: the database's clock (`now()`), one clock for every gateway.
        return self._clock() if self._clock else None

    def _at(self, offset_s: float) -> datetime:
        return (self._clock() if self._clock else datetime.now(UTC)) + timedelta(seconds=offset_s)

    def serving(self, collection: str) -> Serving:
        """The collection's serving generation (0, the deployment's settings, if none)."""
        return self._db.run(lambda cur: _QUERIES.serving(_execute(cur), collection))

    def index_target(self, job_id: str) -> Serving:
        """The generation a job's messages build, and its profile."""
        return self._db.run(lambda cur: _QUERIES.index_target(_execute(cur), job_id))

    def restamp(self, job_id: str) -> None:
        """Point a job at its collection's serving generation."""
        self._db.run(lambda cur: _QUERIES.restamp(_execute(cur), job_id))

    def start_reindex(self, reindex_id: str, collection: str, profile: IndexProfile) -> Reindex:
        """Record a running reindex into the next unused generation."""

        def work(cur: Cursor) -> Reindex:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"reindex:{collection}",)
            )
            return _QUERIES.start(_execute(cur), self._now(), reindex_id, collection, profile)

        return self._db.run(work)

    def reindex(self, reindex_id: str) -> Reindex | None:
        """One reindex."""
        return self._db.run(lambda cur: _QUERIES.get(_execute(cur), reindex_id))

    def active_reindex(self, collection: str) -> Reindex | None:
        """The collection's running or switching reindex, if any."""
        return self._db.run(lambda cur: _QUERIES.active(_execute(cur), collection))

    def latest_reindexes(self) -> dict[str, Reindex]:
        """Each collection's newest reindex (its active one, if any)."""
        return self._db.run(lambda cur: _QUERIES.latest(_execute(cur)))

    def reindexes_to_watch(self, straggler_window_s: float) -> list[Reindex]:
        """Reindexes the monitor still has work for."""
        since = self._at(-straggler_window_s)
        return self._db.run(lambda cur: _QUERIES.to_watch(_execute(cur), since))

    def add_reindex_jobs(self, reindex_id: str, room: int) -> list[ReindexJob]:
        """Record the reindex's next jobs, up to `room` in flight."""
        return self._db.run(
            lambda cur: _QUERIES.add_jobs(_execute(cur), self._now(), reindex_id, room)
        )

    def unconfirmed_reindex_jobs(
        self, reindex_id: str, older_than_s: float, lease_s: float
    ) -> list[ReindexJob]:
        """The reindex's jobs never confirmed, leased to the caller to publish again."""
        before, until = self._at(-older_than_s), self._at(lease_s)
        return self._db.run(
            lambda cur: _QUERIES.unconfirmed(_execute(cur), reindex_id, before, until, self._now())
        )

    def advance_reindex(self, reindex_id: str, *, force: bool = False) -> Reindex | None:
        """Count the reindex's progress and fail, wait or switch it."""
        return self._db.run(
            lambda cur: _QUERIES.advance(_execute(cur), self._now(), reindex_id, force=force)
        )

    def cancel_reindex(self, collection: str) -> Reindex | None:
        """End the collection's active reindex as cancelled."""
        return self._db.run(lambda cur: _QUERIES.cancel(_execute(cur), self._now(), collection))

    def reindex_in_flight(self, reindex_id: str) -> int:
        """How many of the reindex's jobs have not ended."""
        return self._db.run(lambda cur: _QUERIES.in_flight(_execute(cur), reindex_id))

    def mark_dropped(self, reindex_id: str) -> None:
        """The generation the reindex made obsolete is gone from the index."""
        self._db.run(lambda cur: _QUERIES.mark_dropped(_execute(cur), reindex_id))
