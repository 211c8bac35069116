"""Failover across the brokers of `SLUICE_AMQP_URL`, on one real node reached by several
names: a dead URL is passed over, a lost connection comes back on the next URL with its
consumers, and no password reaches the log."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import aio_pika
import httpx
import pytest
from broker import BrokerHandle, PrivateBroker
from pipeline import credentials

from contracts import routing
from contracts.settings import Settings
from stages.infra.broker import Broker
from stages.infra.failover import connect_first

pytestmark = pytest.mark.integration


def _dead_url() -> str:
    """A URL nothing listens at (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"


async def test_a_lost_connection_comes_back_on_the_next_url(
    own_broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    live = own_broker.amqp_url
    # The same node under another name: where the connection went shows in its URL.
    other = live.replace("@127.0.0.1:", "@localhost:")
    caplog.set_level(logging.WARNING)
    connection = await connect_first(
        [_dead_url(), live, other], wait_s=30, client_properties={"connection_name": "t"}
    )
    try:
        assert (connection.url.host, connection.url.port) == ("127.0.0.1", own_broker.ports.amqp)
        queue_name = f"failover-{uuid.uuid4().hex[:8]}"
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await received.put(message.body)
            await message.ack()

        await queue.consume(on_message)

        # The node drops every connection, as it does for one of its clients when it dies.
        await asyncio.to_thread(own_broker.rabbitmqctl, "close_all_connections", "test")
        deadline = time.monotonic() + 30
        while not (connection.url.host == "localhost" and connection.connected.is_set()):
            assert time.monotonic() < deadline, f"still on {connection.url} after the loss"
            await asyncio.sleep(0.05)

        # The consumer was restored on the new connection.
        async with await aio_pika.connect(live) as sender:
            publishing = await sender.channel(publisher_confirms=True)
            await publishing.default_exchange.publish(
                aio_pika.Message(b"after the loss"), routing_key=queue_name
            )
        assert await asyncio.wait_for(received.get(), timeout=30) == b"after the loss"
    finally:
        await connection.close()
    logged = caplog.text
    assert "guest:***@127.0.0.1" in logged  # the dead URL was named...
    assert "guest:guest" not in logged  # ...without its password


async def test_one_node_takes_a_group_size_larger_than_itself(broker: BrokerHandle) -> None:
    """RabbitMQ caps the replicas at the nodes there are, so a cluster's setting also runs
    on one node (a developer's machine, CI)."""
    settings = Settings(
        amqp_url=broker.amqp_url,
        namespace=f"t{uuid.uuid4().hex[:8]}",
        quorum_initial_group_size=3,
    )
    client = Broker(settings)
    await client.connect(wait_s=30)
    await client.close()
    user, password = credentials(broker.amqp_url)
    queue = routing.retry_queue(settings.namespace, "embed", settings.retry_delays_s[0])
    async with httpx.AsyncClient(auth=(user, password), timeout=10) as management:
        info = (await management.get(f"{broker.management_url}/api/queues/%2F/{queue}")).json()
    assert info["type"] == "quorum"
    assert len(info["members"]) == 1
