"""The change feed: how a gateway hears that a job changed, whichever gateway changed it.

`GET /v1/jobs/{id}/events` streams wait on `JobChanges`, the gateway's local fan-out. The
gateway's own tracker wakes it directly (cheap, immediate). A change feed wakes it for
changes made elsewhere:

- SQLite: the store belongs to one gateway, so nothing changes elsewhere; the feed does
  nothing (`InProcessChangeFeed`).
- PostgreSQL: every transaction that changes a job a client may follow sends
  `pg_notify('sluice_jobs', job_id)`; each gateway holds one connection that LISTENs and
  wakes its streams (`PgChangeFeed`).

Why LISTEN/NOTIFY rather than a fanout exchange with one auto-delete queue per gateway: the
store is the source of truth, and a notification commits with the change it announces, so
a woken stream always reads the new state (a broker message sent after the commit could be
lost with the gateway in between, one sent before could arrive ahead of the data); it needs
no extra broker topology, nor a broker at all for a job's stream to move; and the payload is
only the job id, so nothing that PostgreSQL limits (8000 bytes a payload) is ever near.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import psycopg

from contracts.settings import Settings

log = logging.getLogger(__name__)

# The notification channel every PostgreSQL job store sends on and every feed listens to.
CHANNEL = "sluice_jobs"
APPLICATION_NAME = "sluice-change-feed"


class ChangeSink(Protocol):
    """What a feed wakes (`gateway.http.services.JobChanges`)."""

    def notify(self, job_id: str) -> None:
        """A job changed."""
        ...

    def notify_all(self) -> None:
        """Changes may have been missed: every follower should look again."""
        ...


class ChangeFeed(Protocol):
    """Hears job changes made by any gateway and passes each to its sink."""

    async def start(self) -> None:
        """Begin listening (returns once listening, or once the first attempt failed)."""
        ...

    async def stop(self) -> None:
        """Stop listening and let go of any connection."""
        ...


class InProcessChangeFeed:
    """The feed of a store only this gateway writes: its tracker already wakes its streams."""

    async def start(self) -> None:
        """Nothing to listen to."""

    async def stop(self) -> None:
        """Nothing to let go of."""


class PgChangeFeed:
    """LISTENs on one connection of its own and wakes the sink for every job notified.

    A dropped connection is opened again with backoff; changes made while it was away were
    not heard, so every follower is woken to look again once it is back.
    """

    def __init__(
        self,
        url: str,
        sink: ChangeSink,
        *,
        backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0),
        # A quiet connection is tested this often, so a silent network drop is noticed.
        keepalive_s: float = 30.0,
        connect_timeout_s: int = 5,
    ) -> None:
        self.url = url
        self.sink = sink
        self.backoff_s = backoff_s
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self.listening = asyncio.Event()

    async def start(self) -> None:
        """Begin listening; returns once the first connection is listening or has failed."""
        self._task = asyncio.create_task(self._listen_forever(), name="job-change-feed")
        await self._first_attempt.wait()

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                if self.listening.is_set():
                    failures = 0  # it was listening: the backoff starts over
                delay = self.backoff_s[min(failures, len(self.backoff_s) - 1)]
                failures += 1
                self.listening.clear()
                self._first_attempt.set()
                log.warning(
                    "job change feed: lost PostgreSQL (%s); listening again in %.1f s",
                    " ".join(str(exc).split()) or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _listen(self) -> None:
        """Listen until the connection fails (raises; never returns)."""
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=self.connect_timeout_s,
            # So an operator can tell it apart in pg_stat_activity.
            application_name=APPLICATION_NAME,
        )
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            self._first_attempt.set()
            # Whatever changed while no connection listened went unheard.
            self.sink.notify_all()
            log.info("job change feed: listening on PostgreSQL channel %s", CHANNEL)
            while True:
                async for note in conn.notifies(timeout=self.keepalive_s):
                    self.sink.notify(note.payload)
                await conn.execute("SELECT 1")


def open_change_feed(settings: Settings, changes: ChangeSink) -> ChangeFeed:
    """The feed for the job store the settings choose, waking `changes`."""
    url = settings.job_store_url
    if url and url.startswith(("postgresql://", "postgres://")):
        return PgChangeFeed(url, changes)
    return InProcessChangeFeed()
