"""The one place that connects to RabbitMQ, declares the topology and publishes with confirms.

Used by the stage runtime (which needs only what its `BrokerPort` protocol names,
stages/runtime/ports.py) and by the gateway (uploads, the job tracker, retries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from aiormq.exceptions import AMQPError

from contracts import routing
from contracts.errors import Transient
from contracts.events import JobEvent, WorkerHeartbeat
from contracts.messages import Message
from contracts.settings import Settings
from contracts.topology import Topology, topology

log = logging.getLogger(__name__)

Publishable = Message | JobEvent | WorkerHeartbeat


class PublishRejected(Transient):
    """The broker refused a message (queue full with `reject-publish`, or unroutable)."""

    code = "pipeline_saturated"


def routing_key_for(model: Publishable, routing_key: str | None) -> str:
    """Where `publish` sends a model: a job event or heartbeat to its own key, a message to
    `routing_key` (the plain key; `publish_key` adds the lane)."""
    if isinstance(model, JobEvent | WorkerHeartbeat):
        return model.routing_key
    if routing_key is None:
        raise ValueError(f"a {type(model).__name__} needs a routing key to be published")
    return routing_key


def publish_key(settings: Settings, model: Publishable, routing_key: str | None) -> str:
    """The key a publish goes out with: a message to its lane's key (`doc.parsed.bulk`) while
    lanes are on, to the plain key (one FIFO per stage) while they are off."""
    key = routing_key_for(model, routing_key)
    if isinstance(model, Message) and settings.lanes:
        return routing.lane_key(key, model.priority)
    return key


def message_id(model: Publishable, routing_key: str) -> str:
    """The id a published model carries: the same unit of work always gets the same id
    (named by the plain key, so it does not change with the lane)."""
    if isinstance(model, JobEvent):
        return f"{model.job_id}.{model.stage}.{model.kind}.{model.batch_index}"
    if isinstance(model, WorkerHeartbeat):
        return f"{model.worker_id}.{model.at.timestamp():.3f}"
    index, _, _ = model.unit()
    return f"{model.job_id}.{routing_key}.{index}"


async def declare(channel: AbstractChannel, topo: Topology) -> dict[str, AbstractQueue]:
    """Declare every exchange, queue and binding; safe to run from every process, every start."""
    return {q.name: await declare_queue(channel, topo, q.name) for q in topo.queues}


async def declare_queue(channel: AbstractChannel, topo: Topology, name: str) -> AbstractQueue:
    """Declare one queue with its arguments and bindings (and the exchanges it needs).

    Declared on a robust channel, the queue and its bindings are declared again after every
    reconnect, so a queue that vanished (deleted, or lost with its node) comes back.
    """
    spec = topo.queue(name)
    # aio-pika's FieldTable is invariant in its values; ours are plain ints and strings.
    arguments: dict[str, Any] = spec.arguments.as_amqp()
    queue = await channel.declare_queue(spec.name, durable=True, arguments=arguments)
    if spec.exchange is not None:
        kind = next(e.type for e in topo.exchanges if e.name == spec.exchange)
        exchange = await channel.declare_exchange(spec.exchange, kind, durable=True)
        for key in spec.binding_keys:
            await queue.bind(exchange, routing_key=key)
    return queue


def amqp_message(
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    type_: str | None = None,
) -> aio_pika.Message:
    """A persistent JSON message."""
    return aio_pika.Message(
        body,
        headers=dict(headers or {}),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=type_,
    )


class Broker:
    """A robust connection with one confirmed publishing channel and the topology declared."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = topology(settings)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self.publish_timeout_s = 10.0

    @property
    def connection(self) -> AbstractRobustConnection:
        """The live connection (after `connect`)."""
        if self._connection is None:
            raise RuntimeError("Broker.connect() was not called")
        return self._connection

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now (it reconnects by itself when lost)."""
        # A robust connection is not "closed" while it reconnects; `connected` says if it is up.
        return (
            self._connection is not None
            and self._channel is not None
            and self._connection.connected.is_set()
            and not self._connection.is_closed
        )

    async def connect(self, *, wait_s: float = 60.0) -> None:
        """Connect (waiting up to `wait_s` for the broker to answer) and declare the topology."""
        deadline = asyncio.get_running_loop().time() + wait_s
        delay = 0.5
        while True:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.settings.amqp_url, client_properties={"connection_name": "sluice"}
                )
                break
            except (OSError, AMQPError) as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise Transient(
                        f"RabbitMQ does not answer at {self.settings.amqp_url}: {exc}. "
                        "Start it (scripts/ensure-rabbitmq.sh) or set SLUICE_AMQP_URL."
                    ) from exc
                log.warning("waiting for RabbitMQ at %s: %s", self.settings.amqp_url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # on_return_raises: an unroutable message is an error, never silently dropped.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await declare(self._channel, self.topology)
        for spec in self.topology.exchanges:
            self._exchanges[spec.name] = await self._channel.get_exchange(spec.name)

    async def consumer_channel(self, prefetch: int) -> AbstractChannel:
        """A channel for consuming, with per-consumer prefetch (quorum queues refuse global)."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def consume(
        self,
        queue: str,
        prefetch: int,
        on_delivery: Callable[[AbstractIncomingMessage], Awaitable[None]],
    ) -> _Consumer:
        """Consume `queue` on a channel of its own with per-consumer `prefetch`."""
        channel = await self.consumer_channel(prefetch)
        # Declared (not just looked up) on the robust channel: if the broker cancels the
        # consumer because the queue went away, recovery declares it again and re-consumes.
        declared = await declare_queue(channel, self.topology, queue)
        tag = await declared.consume(on_delivery)
        return _Consumer(channel, declared, tag)

    async def publish(
        self,
        model: Publishable,
        routing_key: str | None = None,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish a message (to `routing_key`, the next stage's input, in the message's lane)
        or a job event or heartbeat (to its own key) on the main exchange, and wait for the
        broker's confirm."""
        await self.publish_raw(
            routing.exchange(self.settings.namespace),
            publish_key(self.settings, model, routing_key),
            model.model_dump_json().encode(),
            headers=headers,
            message_id=message_id(model, routing_key_for(model, routing_key)),
            type_=type(model).__name__,
        )

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        type_: str | None = None,
    ) -> None:
        """Publish bytes to an exchange (`""` is the default exchange) with confirms."""
        if self._channel is None:
            raise RuntimeError("Broker.connect() was not called")
        target = self._exchanges.get(exchange) or self._channel.default_exchange
        message = amqp_message(body, headers=headers, message_id=message_id, type_=type_)
        try:
            # A publish never waits forever: while the broker is away, callers answer 503.
            await target.publish(
                message, routing_key=routing_key, mandatory=True, timeout=self.publish_timeout_s
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishRejected(
                f"RabbitMQ refused a message for {routing_key!r} ({exc}); "
                "the pipeline is full or a queue is missing."
            ) from exc
        except (TimeoutError, AMQPError, ConnectionError, RuntimeError) as exc:
            raise Transient(f"publishing to {routing_key!r} failed: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; unacked deliveries go back to their queues."""
        if self._connection is not None:
            await self._connection.close()


class _Consumer:
    """One consumer and the channel it holds (the runtime's `Consuming`)."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, tag: ConsumerTag) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = tag

    async def cancel(self) -> None:
        """Stop the broker handing out more messages to this consumer."""
        await self._queue.cancel(self._tag)

    async def close(self) -> None:
        """Close the channel: whatever is still unacked goes back to the queue."""
        await self._channel.close()


def header_int(headers: Mapping[str, Any] | None, name: str, default: int) -> int:
    """An integer header, tolerating absence and the types other clients send."""
    value = (headers or {}).get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
