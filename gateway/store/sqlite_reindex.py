"""The SQLite job store's re-indexing part: the shared queries (reindex_queries.py), each in
one transaction of the store's (BEGIN IMMEDIATE: one writer of the file at a time)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from contracts.messages import IndexProfile
from gateway.store.reindex_base import Reindex, ReindexInProgress, ReindexJob, Serving
from gateway.store.reindex_queries import SQLITE, Execute, ReindexQueries, Rows

_QUERIES = ReindexQueries(SQLITE)


def _execute(db: sqlite3.Connection) -> Execute:
    def run(sql: str, params: Mapping[str, object]) -> Rows:
        return db.execute(sql, dict(params))

    return run


class SqliteReindexes:
    """Re-indexing records in the store's file; mixed into `SqliteJobStore`."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    _clock: Callable[[], datetime]

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _at(self, offset_s: float = 0.0) -> str:
        return (self._clock() + timedelta(seconds=offset_s)).isoformat()

    def serving(self, collection: str) -> Serving:
        """The collection's serving generation (0, the deployment's settings, if none)."""
        with self._lock:
            return _QUERIES.serving(_execute(self._db), collection)

    def index_target(self, job_id: str) -> Serving:
        """The generation a job's messages build, and its profile."""
        with self._lock:
            return _QUERIES.index_target(_execute(self._db), job_id)

    def restamp(self, job_id: str) -> None:
        """Point a job at its collection's serving generation."""
        with self._tx() as db:
            _QUERIES.restamp(_execute(db), job_id)

    def start_reindex(self, reindex_id: str, collection: str, profile: IndexProfile) -> Reindex:
        """Record a running reindex into the next unused generation."""
        try:
            with self._tx() as db:
                return _QUERIES.start(_execute(db), self._at(), reindex_id, collection, profile)
        except sqlite3.IntegrityError as exc:
            # The one-active index: another writer's reindex of the collection won.
            active = self.active_reindex(collection)
            raise ReindexInProgress(collection, active.reindex_id if active else "?") from exc

    def reindex(self, reindex_id: str) -> Reindex | None:
        """One reindex."""
        with self._lock:
            return _QUERIES.get(_execute(self._db), reindex_id)

    def active_reindex(self, collection: str) -> Reindex | None:
        """The collection's running or switching reindex, if any."""
        with self._lock:
            return _QUERIES.active(_execute(self._db), collection)

    def reindexes_to_watch(self, straggler_window_s: float) -> list[Reindex]:
        """Reindexes the monitor still has work for."""
        with self._lock:
            return _QUERIES.to_watch(_execute(self._db), self._at(-straggler_window_s))

    def add_reindex_jobs(self, reindex_id: str, room: int) -> list[ReindexJob]:
        """Record the reindex's next jobs, up to `room` in flight."""
        with self._tx() as db:
            return _QUERIES.add_jobs(_execute(db), self._at(), reindex_id, room)

    def unconfirmed_reindex_jobs(
        self, reindex_id: str, older_than_s: float, lease_s: float
    ) -> list[ReindexJob]:
        """The reindex's jobs never confirmed, leased to the caller to publish again."""
        with self._tx() as db:
            return _QUERIES.unconfirmed(
                _execute(db), reindex_id, self._at(-older_than_s), self._at(lease_s), self._at()
            )

    def advance_reindex(self, reindex_id: str, *, force: bool = False) -> Reindex | None:
        """Count the reindex's progress and fail, wait or switch it."""
        with self._tx() as db:
            return _QUERIES.advance(_execute(db), self._at(), reindex_id, force=force)

    def cancel_reindex(self, collection: str) -> Reindex | None:
        """End the collection's active reindex as cancelled."""
        with self._tx() as db:
            return _QUERIES.cancel(_execute(db), self._at(), collection)

    def reindex_in_flight(self, reindex_id: str) -> int:
        """How many of the reindex's jobs have not ended."""
        with self._lock:
            return _QUERIES.in_flight(_execute(self._db), reindex_id)

    def mark_dropped(self, reindex_id: str) -> None:
        """The generation the reindex made obsolete is gone from the index."""
        with self._tx() as db:
            _QUERIES.mark_dropped(_execute(db), reindex_id)

    def latest_reindexes(self) -> dict[str, Reindex]:
        """Each collection's newest reindex (its active one, if any)."""
        with self._lock:
            return _QUERIES.latest(_execute(self._db))
