"""The broker as the stage runtime sees it: a seam with one real side and one test double.

The real side is the aio-pika `Broker` (stages/infra/broker.py), which fits these protocols
without knowing them (infra sits below the runtime); the double is `MemoryBroker`
(stages/runtime/memory_broker.py), which runs the runtime's whole decision table without
RabbitMQ, naming and refusing publishes as the real one does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from contracts.message_signature import MessageSigner
from contracts.settings import Settings
from contracts.topology import Topology

# What a publish takes and how a refusal is raised are the real broker's; the port names them.
from stages.infra.broker import Publishable as Publishable
from stages.infra.broker import PublishRejected as PublishRejected


class Delivery(Protocol):
    """One message handed to a consumer, to be settled exactly once (ack or nack)."""

    @property
    def body(self) -> bytes:
        """The message's bytes, as published."""
        ...

    @property
    def headers(self) -> Mapping[str, Any]:
        """AMQP headers: trace context, `x-sluice-attempt`, `x-delivery-count`..."""
        ...

    @property
    def routing_key(self) -> str | None:
        """The key it was published (or dead-lettered back) with."""
        ...

    @property
    def message_id(self) -> str | None:
        """The publisher's id for the unit of work it carries."""
        ...

    async def ack(self) -> None:
        """Done with it: the queue forgets it."""
        ...

    async def nack(self, *, requeue: bool) -> None:
        """Not done: hand it back to the queue (`requeue`) or drop it."""
        ...


OnDelivery = Callable[[Delivery], Awaitable[None]]


class Consuming(Protocol):
    """A consumer on one queue, as `BrokerPort.consume` returns it."""

    async def cancel(self) -> None:
        """Take no more deliveries; those in hand may still be settled."""
        ...

    async def close(self) -> None:
        """Release the consumer; deliveries still unsettled go back to the queue."""
        ...


class BrokerPort(Protocol):
    """What the stage runtime needs of a broker: confirmed publishes and one consumer."""

    @property
    def settings(self) -> Settings:
        """The settings the broker was made with (namespace, pipeline)."""
        ...

    @property
    def topology(self) -> Topology:
        """Every exchange, queue and binding of this namespace."""
        ...

    @property
    def signer(self) -> MessageSigner:
        """What `publish` signs with and what consumers check deliveries against."""
        ...

    async def publish(
        self,
        model: Publishable,
        routing_key: str | None = None,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish a message to `routing_key` (a job event to its own key) on the main exchange,
        and wait for the confirm."""
        ...

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
        """Publish bytes (`""` is the default exchange) and wait for the confirm; raises
        `PublishRejected` when refused and `Transient` when the broker cannot be reached."""
        ...

    async def consume(self, queue: str, prefetch: int, on_delivery: OnDelivery) -> Consuming:
        """Call `on_delivery` for each message of `queue`, holding at most `prefetch` unsettled."""
        ...
