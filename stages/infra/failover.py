"""A robust connection over several RabbitMQ nodes: each reconnect goes to the next one.

aio-pika's robust connection reconnects to the one URL it was made with, so a process whose
node died would wait for that node for ever. `FailoverConnection` keeps aio-pika's recovery
(every channel, QoS, declaration, binding and consumer made on it comes back by itself, so
the stage runner, the tracker and the pipeline monitor need nothing of their own) and only
changes where each attempt goes: to the next URL of the list, round and round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from aio_pika.abc import UnderlayConnection
from aiormq.exceptions import AMQPError
from yarl import URL

from contracts.broker_urls import redacted
from contracts.errors import Transient

log = logging.getLogger(__name__)

# Between attempts of a reconnect (aio-pika waits 5 s): the next node is tried at once after a
# loss, but a restore that fails on the new node (its queues still electing a leader) is
# tried again soon rather than after the 503 window has grown by 5 s.
RECONNECT_INTERVAL_S = 1.0


class FailoverConnection(RobustConnection):
    """A robust connection whose every connection attempt after the first goes to the next
    of `urls`.

    The hook is where aio-pika begins an attempt: it drops the old transport
    (`self.transport = None`, in 9.x and 10.x alike) and then connects to `self.url`. Setting
    `url` there sends the attempt to the next node.
    """

    def __init__(self, urls: Sequence[str], *, first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("FailoverConnection needs at least one URL")
        self._urls = tuple(URL(url) for url in urls)
        self._first = first % len(self._urls)
        self._attempts = 0
        if "reconnect_interval" not in self._urls[self._first].query:
            kwargs.setdefault("reconnect_interval", RECONNECT_INTERVAL_S)
        super().__init__(self._urls[self._first], **kwargs)

    @property
    def transport(self) -> UnderlayConnection | None:
        """The live transport, if any (aio-pika's attribute, watched to choose the node)."""
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # The base class's `__init__` sets it before it has `_close_called` (no attempt yet);
        # `close` sets it with `_close_called` (no attempt follows).
        if value is None and not getattr(self, "_close_called", True):
            self._next_url()
        self._transport = value

    @property
    def node_index(self) -> int:
        """Which of the URLs the current (or next) attempt goes to."""
        return (self._first + max(self._attempts - 1, 0)) % len(self._urls)

    def _next_url(self) -> None:
        self._attempts += 1
        url = self._urls[self.node_index]
        # With one URL, aio-pika says it reconnects; which node it tries is news only with several.
        if self._attempts > 1 and len(self._urls) > 1:
            log.warning(
                "RabbitMQ connection lost or refused; trying node %d of %d at %s",
                self.node_index + 1,
                len(self._urls),
                redacted(str(url)),
            )
        self.url = url


async def connect_first(
    urls: Sequence[str],
    *,
    wait_s: float,
    client_properties: dict[str, Any],
) -> FailoverConnection:
    """Connect to the first of `urls` that answers, trying each in turn and waiting up to
    `wait_s` in all; the connection then fails over across all of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    delay = 0.5
    attempt = 0
    while True:
        index = attempt % len(urls)
        connection = FailoverConnection(urls, first=index, client_properties=client_properties)
        try:
            await connection.connect()
            return connection
        except (OSError, AMQPError) as exc:
            await connection.close()
            attempt += 1
            where = redacted(urls[index])
            # A full round refused: wait before the next (the nodes may all be starting).
            pause = delay if attempt % len(urls) == 0 else 0.0
            if loop.time() + pause > deadline:
                named = ", ".join(redacted(url) for url in urls)
                raise Transient(
                    f"RabbitMQ does not answer at {named}: {exc}. "
                    "Start it (scripts/ensure-rabbitmq.sh) or set SLUICE_AMQP_URL."
                ) from exc
            log.warning("waiting for RabbitMQ at %s: %s", where, exc)
            if pause:
                await asyncio.sleep(pause)
                delay = min(delay * 2, 5.0)
