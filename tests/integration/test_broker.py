"""The private test broker is a real RabbitMQ: quorum queues, confirms, restarts, management."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import httpx
import pytest
from broker import BrokerHandle, PrivateBroker
from pamqp.commands import Basic

pytestmark = pytest.mark.integration


async def test_persistent_message_survives_restart(own_broker: PrivateBroker) -> None:
    """A confirmed persistent message in a durable quorum queue outlives a broker restart."""
    broker = own_broker
    queue_name = f"sluice-test-broker-{uuid.uuid4().hex[:8]}"
    body = f"survives-{uuid.uuid4().hex}".encode()

    connection = await aio_pika.connect(broker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 5},
        )
        # With confirms on, publish() returns only after the broker acked the message.
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert isinstance(confirmation, Basic.Ack), f"broker did not confirm: {confirmation!r}"

    # restart() blocks for seconds; keep the session event loop free meanwhile.
    await asyncio.to_thread(broker.restart)

    connection = await aio_pika.connect(broker.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 5},
        )
        message = await queue.get(timeout=10, fail=False)
        assert message is not None, "the persistent message was lost across the restart"
        assert message.body == body
        await message.ack()
        await queue.delete(if_unused=False, if_empty=False)


async def test_management_api_answers(broker: BrokerHandle) -> None:
    """The management plugin serves /api/overview for guest."""
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        response = await client.get(f"{broker.management_url}/api/overview")
    assert response.status_code == 200
    assert "rabbitmq_version" in response.json()
