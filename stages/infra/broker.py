"""The one place that connects to RabbitMQ, declares the topology and publishes with confirms.

Used by the stage runtime (which needs only what its `BrokerPort` protocol names,
stages/runtime/ports.py) and by the gateway (uploads, the job tracker, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import cached_property
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
from contracts.events import JobEvent, JobEvents, WorkerHeartbeat
from contracts.message_signature import SIGNATURE_HEADER, MessageSigner
from contracts.messages import Message
from contracts.settings import Settings
from contracts.topology import Topology, topology
from stages.infra.failover import connect_first
from stages.infra.queue_room import at_length_limit
from stages.infra.signing import signer_of

log = logging.getLogger(__name__)

Publishable = Message | JobEvent | JobEvents | WorkerHeartbeat


class PublishRejected(Transient):
    """The broker refused a message (queue full with `reject-publish`, or unroutable)."""

    code = "pipeline_saturated"


class QueueUnavailable(PublishRejected):
    """A queue nacked a message while it has room: it has no leader for the moment (a node of
    the cluster was lost). A stage waits as for backpressure; an upload is answered 503."""

    code = "broker_unavailable"


def routing_key_for(model: Publishable, routing_key: str | None) -> str:
    """Where `publish` sends a model: a job event or heartbeat to its own key, a message to
    `routing_key` (the plain key; `publish_key` adds the lane)."""
    if isinstance(model, JobEvent | JobEvents | WorkerHeartbeat):
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
    if isinstance(model, JobEvents):
        units = sorted(f"{e.job_id}.{e.stage}.{e.batch_index}" for e in model.events)
        digest = hashlib.sha256("\n".join(units).encode()).hexdigest()[:32]
        return f"{model.stage}.progress.{digest}"
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
        # Holds the topology's declarations, which aio-pika declares again after a reconnect;
        # apart from the publishing channel, which may be swapped for a new one.
        self._declaring: AbstractChannel | None = None
        self._renewing = asyncio.Lock()
        self.publish_timeout_s = 10.0
        # How long a publish waits for a queue without a leader (a node lost) to elect one.
        self.leader_wait_s = 5.0

    @cached_property
    def signer(self) -> MessageSigner:
        """What this process signs its messages with, and checks everyone else's with."""
        return signer_of(self.settings)

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
        """Connect to the first broker of `SLUICE_AMQP_URL` that answers (waiting up to `wait_s`)
        and declare the topology; a lost node is replaced by the next one of the list.

        Connected only once everything is declared: until then `is_connected` is False (an
        upload is answered 503, not sent to an exchange not yet there). A node lost while
        declaring (a cluster's quorum queues take a while) means starting over on the next.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            connection = await connect_first(
                self.settings.amqp_urls,
                wait_s=max(deadline - loop.time(), 0.0),
                client_properties={"connection_name": "sluice"},
            )
            try:
                declaring = await connection.channel()
                await declare(declaring, self.topology)
                channel, exchanges = await self._publishing_channel(connection)
                break
            except (AMQPError, ConnectionError, RuntimeError) as exc:
                await connection.close()
                if loop.time() > deadline:
                    raise Transient(f"declaring Sluice's queues on RabbitMQ failed: {exc}") from exc
                log.warning("RabbitMQ went away while Sluice's queues were declared: %s", exc)
        self._connection, self._declaring = connection, declaring
        self._exchanges, self._channel = exchanges, channel

    async def _publishing_channel(
        self, connection: AbstractRobustConnection
    ) -> tuple[AbstractChannel, dict[str, AbstractExchange]]:
        """A channel with confirms for publishing, and the exchanges on it."""
        # on_return_raises: an unroutable message is an error, never silently dropped.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = {
            spec.name: await channel.get_exchange(spec.name) for spec in self.topology.exchanges
        }
        return channel, exchanges

    async def _renew_publishing(self, stuck: AbstractChannel) -> None:
        """Swap a publishing channel RabbitMQ keeps nacking for a new one.

        A channel that published to a quorum queue while its leader's node was going down can
        go on being nacked for that queue after a new leader is elected (seen on 3.10: for
        a minute and more), while a new channel on the same connection is served at once.
        """
        async with self._renewing:
            if self._channel is not stuck:
                return  # another publish renewed it already
            try:
                channel, exchanges = await self._publishing_channel(self.connection)
            except (AMQPError, ConnectionError, RuntimeError) as exc:
                log.warning("could not open a new publishing channel yet: %s", exc)
                return
            self._channel, self._exchanges = channel, exchanges
        log.warning("RabbitMQ nacked publishes to queues with room; publishing on a new channel")
        with contextlib.suppress(AMQPError, ConnectionError, RuntimeError):
            await stuck.close()

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
        or a job event or heartbeat (to its own key) on the main exchange, signed, and wait
        for the broker's confirm."""
        body = model.model_dump_json().encode()
        topic = routing_key_for(model, routing_key)
        await self.publish_raw(
            routing.exchange(self.settings.namespace),
            publish_key(self.settings, model, routing_key),
            body,
            headers={**(headers or {}), SIGNATURE_HEADER: self.signer.sign(topic, body)},
            message_id=message_id(model, topic),
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
        """Publish bytes to an exchange (`""` is the default exchange) with confirms.

        Nothing is signed here: what goes out raw is a delivery moved on (to a retry tier, the
        dead letters, a replay) with the signature it came with, or none if it had none."""
        if self._channel is None:
            raise RuntimeError("Broker.connect() was not called")
        message = amqp_message(body, headers=headers, message_id=message_id, type_=type_)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.leader_wait_s
        pause = 0.1
        while True:
            try:
                await self._publish_once(message, exchange, routing_key)
                return
            except QueueUnavailable:
                # Elections take about a second: waiting here spares the caller a 503 and a
                # stage a redelivery (each counts towards the queue's delivery limit).
                if loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _publish_once(
        self, message: aio_pika.Message, exchange: str, routing_key: str
    ) -> None:
        """One confirmed publish on the current channel; a refusal raised as what it means."""
        channel = self._channel
        assert channel is not None
        target = self._exchanges.get(exchange) or channel.default_exchange
        try:
            # A publish never waits forever: while the broker is away, callers answer 503.
            await target.publish(
                message, routing_key=routing_key, mandatory=True, timeout=self.publish_timeout_s
            )
        except aio_pika.exceptions.DeliveryError as exc:
            # A nack (not a return: unroutable) from queues with room is a failover.
            if not isinstance(exc, aio_pika.exceptions.PublishError) and not (
                await at_length_limit(self.connection, self.topology, exchange, routing_key)
            ):
                await self._renew_publishing(channel)
                raise QueueUnavailable(
                    f"RabbitMQ did not take a message for {routing_key!r} though its queue "
                    "has room: the queue is electing a new leader (a node was lost); "
                    "try again shortly."
                ) from exc
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
