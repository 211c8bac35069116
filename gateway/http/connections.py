"""The gateway's HTTP connections: uvicorn's h11 protocol with the deadlines and the limit it
lacks, so slow or idle clients cannot hold the gateway's sockets.

uvicorn's only timer is keep-alive, and every byte received resets it: a client trickling a
header byte a second holds its socket for ever, and 800 of them hold 800. ASGI middleware
cannot help there: it first runs once the request head is complete. So, per connection:

- Its request head (line and headers) must be complete `header_timeout_s` after the
  connection opened, or after the head's first byte on a kept-alive connection; else the
  connection is closed.
- At most `max_connections` at once. One more closes the connection that has waited longest
  between requests (idle, or trickling a head: nothing of it is lost), so /healthz is still
  answered through a flood of slow clients; when every connection is busy with a request,
  the newcomer is answered 503 `too_many_connections` and closed.
- A body the app did not read to its end (it answered early: 401, 413, 408) is drained for
  `drain_s` at most, then the connection is closed: closing at once would reset the
  connection under the client before it read the answer, draining without end would let a
  client hold the socket by trickling.

A body that stalls while the app reads it is answered 408 by gateway/http/body_limits.py.
uvicorn's own 400 for a malformed request answers in the API's JSON shape here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from contracts.settings import Settings

log = logging.getLogger(__name__)
# Descriptors the gateway needs besides its connections: stores, staging files, the broker.
_SPARE_FILES = 256
# h11's default, said here: the most a request line and headers may take together.
MAX_HEAD_BYTES = 16 * 1024


def _raw_answer(status: int, reason: str, code: str, message: str, *extra: str) -> bytes:
    """A whole JSON error answer as bytes, for a connection with no request cycle to send by."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY = _raw_answer(
    503,
    "Service Unavailable",
    "too_many_connections",
    "The gateway holds as many connections as it may (SLUICE_MAX_CONNECTIONS), all busy; "
    "try again shortly.",
    "retry-after: 1",
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a connection limit and a bounded drain."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000
    drain_s: ClassVar[float] = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._drain_deadline: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        """Start the head deadline; make room past the limit, or refuse the newcomer."""
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._arm_head_deadline()
        if self._over_limit() and not self._make_room():
            log.warning(
                "refused a connection: all %d connections are busy (SLUICE_MAX_CONNECTIONS)",
                self.max_connections,
            )
            self.transport.write(_TOO_MANY)
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop this connection's timers."""
        self._cancel_head_deadline()
        if self._drain_deadline is not None:
            self._drain_deadline.cancel()
            self._drain_deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed h11; a head now under way gets its deadline, a complete one loses it."""
        super().data_received(data)
        if self._between_requests():
            self._arm_head_deadline()
        else:
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        """A request is answered: idle from now, draining what is left of its body."""
        super().on_response_complete()
        self._idle_since = self.loop.time()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            cycle = self.cycle
            self._drain_deadline = self.loop.call_later(self.drain_s, self._drain_expired, cycle)

    def send_400_response(self, msg: str) -> None:
        """A malformed request (or a head past its size) answered in the API's shape."""
        self.transport.write(
            _raw_answer(400, "Bad Request", "invalid_http", f"{msg} The connection is closed.")
        )
        self._close()

    def _between_requests(self) -> bool:
        """No request in hand: idle, or a head still arriving."""
        return self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self._between_requests():
            log.debug("closed a connection whose request head was not complete in time")
            self._close()

    def _drain_expired(self, cycle: object) -> None:
        self._drain_deadline = None
        # Still the same request's body (not a later request's), still arriving.
        if self.cycle is cycle and self.conn.their_state is h11.SEND_BODY:
            self._close()

    def _over_limit(self) -> bool:
        """More connections than the limit, not counting those already closing."""
        if len(self.connections) <= self.max_connections:
            return False
        closing = sum(
            1
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c.transport.is_closing()
        )
        return len(self.connections) - closing > self.max_connections

    def _make_room(self) -> bool:
        """Close the connection idle longest (not this one); whether there was one."""
        idle = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol)
            and c is not self
            and not c.transport.is_closing()
            and c._between_requests()
        ]
        if not idle:
            return False
        min(idle, key=lambda c: c._idle_since)._close()
        return True

    def _close(self) -> None:
        self._cancel_head_deadline()
        if not self.transport.is_closing():
            # Mid-message h11 refuses to record the close: the closed socket says it all.
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class with this gateway's deadlines and limit."""

    class Configured(GuardedH11Protocol):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return Configured


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the gateway (besides the app, host and port)."""
    return {
        "http": protocol_for(settings),
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        # Our handler formats uvicorn's lines too (JSON off a terminal, with trace ids).
        "log_config": None,
        "log_level": "info",
        # Longer than clients keep idle connections (httpx: 5 s), so a client never sends on
        # a connection the server is just closing (seen as ReadError under load at 5 s each).
        "timeout_keep_alive": 30,
        "timeout_graceful_shutdown": 10,
    }


def fit_open_files(max_connections: int) -> None:
    """Raise the process's open-file limit to hold `max_connections`, where the system lets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        if raised < needed:
            log.warning(
                "the open-file limit (%d) holds fewer than SLUICE_MAX_CONNECTIONS=%d "
                "connections; lower it or raise the limit (ulimit -n)",
                raised,
                max_connections,
            )
