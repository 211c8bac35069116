"""TEST DOUBLE: RabbitMQ in memory, behind the runtime's `BrokerPort`, for fast unit tests.

Modelled on FastStream's `TestRabbitBroker` and Dramatiq's `StubBroker`: the runtime's whole
decision table runs against it in milliseconds, without RabbitMQ. It keeps what the runtime
relies on: routing by the namespace's topology (contracts/topology.py; topic bindings,
the default exchange by queue name), unroutable publishes and full `reject-publish` queues
refused with `PublishRejected`, deliveries settled exactly once, a nack with requeue handed
back with `x-delivery-count` one higher, and retry tiers that hand messages back to their
stage when told their TTL passed (`expire`). A test can make publishes to a key be refused
(`refuse`) or fail (`fail`), and declare a queue of its own (`declare`, as the gateway's
heartbeat queue is). `drain` hands out one message at a time; `flow` hands each consumer
up to its prefetch at once, each in a task, as RabbitMQ and aio-pika do. Not modelled:
confirms timing, the quorum queue's own delivery limit. What only a real broker can show
stays in tests/integration/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from contracts import routing
from contracts.errors import Transient
from contracts.message_signature import SIGNATURE_HEADER, MessageSigner
from contracts.settings import Settings
from contracts.topology import QueueSpec, Topology, topology
from stages.infra.broker import message_id, publish_key, routing_key_for
from stages.runtime.ports import OnDelivery, Publishable, PublishRejected
from stages.runtime.reading import DELIVERY_COUNT_HEADER

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Published:
    """One confirmed publish, as the broker took it."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None = None
    type_: str | None = None

    def json(self) -> Any:
        """The body, parsed as JSON."""
        return json.loads(self.body)

    def model(self, model: type[M]) -> M:
        """The body, validated as `model`."""
        return model.model_validate_json(self.body)


# Every message queued gets the next number: `flow` hands out the oldest first.
_arrivals = itertools.count()


@dataclass
class _Queued:
    message: Published
    routing_key: str
    # Deliveries that ended in a requeue; RabbitMQ shows it as `x-delivery-count`.
    returned: int = 0
    arrived: int = field(default_factory=lambda: next(_arrivals))


@dataclass
class MemoryDelivery:
    """A message handed to a consumer; records how it was settled, and refuses a second time."""

    body: bytes
    headers: Mapping[str, Any]
    routing_key: str | None
    message_id: str | None
    settled: str | None = None
    _broker: MemoryBroker | None = field(default=None, repr=False)
    _queue: str = ""
    _queued: _Queued | None = field(default=None, repr=False)

    @property
    def acked(self) -> bool:
        """Whether it was acked."""
        return self.settled == "ack"

    @property
    def requeued(self) -> bool:
        """Whether it was nacked with requeue (handed back to its queue)."""
        return self.settled == "requeue"

    async def ack(self) -> None:
        """Settle as done."""
        self._settle("ack")

    async def nack(self, *, requeue: bool) -> None:
        """Settle as not done; with `requeue` it goes back to its queue, to be redelivered."""
        self._settle("requeue" if requeue else "drop")
        if requeue and self._broker is not None and self._queued is not None:
            self._queued.returned += 1
            self._broker.queues[self._queue].appendleft(self._queued)

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            # aio-pika raises too: a delivery tag settled twice closes the channel.
            raise RuntimeError(f"delivery {self.message_id} already settled ({self.settled})")
        self.settled = how
        if self._broker is not None:
            self._broker.journal.append(f"{how} {self.message_id}")


class _Consumer:
    def __init__(self, broker: MemoryBroker, queue: str, prefetch: int, on: OnDelivery) -> None:
        self.broker, self.queue, self.prefetch, self.on_delivery = broker, queue, prefetch, on
        self.in_hand: list[MemoryDelivery] = []
        self.closed = False

    def unsettled(self) -> int:
        """Deliveries handed to this consumer and not settled yet (what prefetch bounds)."""
        return sum(1 for d in self.in_hand if d.settled is None)

    async def cancel(self) -> None:
        """Take no more deliveries."""
        self.broker.consumers.pop(self.queue, None)

    async def close(self) -> None:
        """Hand back what is still unsettled, as a closing channel does."""
        await self.cancel()
        self.closed = True
        for delivery in self.in_hand:
            if delivery.settled is None:
                await delivery.nack(requeue=True)


class MemoryBroker:
    """TEST DOUBLE of the broker: queues in memory, routed by the namespace's topology."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology: Topology = topology(settings)
        # Signs as the real broker does; a secret of its own unless the settings name one.
        self.signer = MessageSigner(settings.message_secret or secrets.token_hex(16))
        self.queues: dict[str, deque[_Queued]] = {q.name: deque() for q in self.topology.queues}
        # Every confirmed publish, and every publish, ack and nack in the order they happened.
        self.published: list[Published] = []
        self.journal: list[str] = []
        self.consumers: dict[str, _Consumer] = {}
        self._refused: set[str] = set()
        self._failing: dict[str, BaseException] = {}

    def refuse(self, routing_key: str) -> None:
        """Refuse publishes to `routing_key` as a full `reject-publish` queue does."""
        self._refused.add(routing_key)

    def fail(self, routing_key: str, error: BaseException | None = None) -> None:
        """Fail publishes to `routing_key` with `error`, as a lost connection does."""
        self._failing[routing_key] = error or Transient(f"publishing to {routing_key!r} failed")

    def declare(self, spec: QueueSpec) -> None:
        """Declare a queue of the test's own (a gateway's heartbeat queue) beside the topology."""
        self.topology = Topology(self.topology.exchanges, (*self.topology.queues, spec))
        self.queues.setdefault(spec.name, deque())

    def heal(self) -> None:
        """Take publishes to every key again."""
        self._refused.clear()
        self._failing.clear()

    async def publish(
        self,
        model: Publishable,
        routing_key: str | None = None,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish to the main exchange, as the real broker names and addresses it (a message
        to its lane's key while lanes are on), signed."""
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
        """Route bytes to the queues bound to `routing_key` on `exchange` (`""`: by name)."""
        if routing_key in self._failing:
            raise self._failing[routing_key]
        if routing_key in self._refused:
            raise PublishRejected(f"{routing_key!r} refused (told to by the test)")
        targets = self._route(exchange, routing_key)
        if not targets:
            raise PublishRejected(f"nothing is bound to {routing_key!r} on {exchange!r}")
        full = [q for q in targets if self._is_full(q)]
        if full:
            raise PublishRejected(f"{', '.join(full)} is full (reject-publish)")
        message = Published(exchange, routing_key, body, dict(headers or {}), message_id, type_)
        self.published.append(message)
        self.journal.append(f"publish {exchange}/{routing_key}")
        for queue in targets:
            self.queues[queue].append(_Queued(message, routing_key))

    async def consume(self, queue: str, prefetch: int, on_delivery: OnDelivery) -> _Consumer:
        """Register the consumer of `queue`; `drain` hands it the queue's messages."""
        consumer = _Consumer(self, queue, prefetch, on_delivery)
        self.consumers[queue] = consumer
        return consumer

    def put(
        self,
        queue: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        routing_key: str = "",
        message_id: str | None = None,
        signed: bool = True,
    ) -> None:
        """Put bytes straight into `queue`, as if they had been routed there: `signed` as a
        Sluice process publishes them (for `routing_key`'s topic), else as anyone else does."""
        kept = dict(headers or {})
        if signed:
            topic = (routing_key or queue).removesuffix(f".{routing.BULK}")
            kept.setdefault(SIGNATURE_HEADER, self.signer.sign(topic, body))
        message = Published("", routing_key or queue, body, kept, message_id)
        self.queues[queue].append(_Queued(message, routing_key or queue))

    def take(self, queue: str) -> MemoryDelivery:
        """The oldest message of `queue`, handed out as a delivery (raises if it is empty)."""
        queued = self.queues[queue].popleft()
        headers = dict(queued.message.headers)
        if queued.returned:
            headers[DELIVERY_COUNT_HEADER] = queued.returned
        return MemoryDelivery(
            queued.message.body,
            headers,
            queued.routing_key,
            queued.message.message_id,
            _broker=self,
            _queue=queue,
            _queued=queued,
        )

    async def drain(self, *, limit: int = 1000) -> int:
        """Hand queued messages to their consumers, one at a time, until none is left."""
        handed = 0
        while ready := [q for q in self.consumers if self.queues[q]]:
            if handed >= limit:
                raise RuntimeError(f"still delivering after {limit} deliveries: a message loops")
            consumer = self.consumers[ready[0]]
            delivery = self.take(consumer.queue)
            consumer.in_hand.append(delivery)
            await consumer.on_delivery(delivery)
            handed += 1
        return handed

    async def flow(self, *, limit: int = 1000) -> int:
        """Hand queued messages out as RabbitMQ does: each consumer holds up to its prefetch
        unsettled, each delivery handled in a task of its own, the oldest message first;
        returns once no consumer has anything left to take and every task has finished."""
        handed = 0
        running: set[asyncio.Future[None]] = set()
        while True:
            while ready := [
                c
                for c in self.consumers.values()
                if self.queues[c.queue] and c.unsettled() < c.prefetch
            ]:
                if handed >= limit:
                    raise RuntimeError(
                        f"still delivering after {limit} deliveries: a message loops"
                    )
                consumer = min(ready, key=lambda c: self.queues[c.queue][0].arrived)
                delivery = self.take(consumer.queue)
                consumer.in_hand.append(delivery)
                running.add(asyncio.ensure_future(consumer.on_delivery(delivery)))
                handed += 1
            if not running:
                return handed
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()

    def expire(self) -> int:
        """Let every retry tier's TTL pass: its messages go back where it dead-letters them."""
        moved = 0
        for spec in self.topology.queues:
            back_to = spec.arguments.dead_letter_routing_key
            if spec.arguments.message_ttl_ms is None or back_to is None:
                continue
            while self.queues[spec.name]:
                queued = self.queues[spec.name].popleft()
                self.queues[back_to].append(_Queued(queued.message, back_to))
                moved += 1
        return moved

    def messages(self, queue: str) -> list[Published]:
        """What `queue` holds now, oldest first."""
        return [q.message for q in self.queues[queue]]

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key] if routing_key in self.queues else []
        if all(e.name != exchange for e in self.topology.exchanges):
            raise Transient(f"no exchange {exchange!r} (a channel error on a real broker)")
        return [
            q.name
            for q in self.topology.queues
            if q.exchange == exchange and any(topic_matches(b, routing_key) for b in q.binding_keys)
        ]

    def _is_full(self, queue: str) -> bool:
        arguments = self.topology.queue(queue).arguments
        return (
            arguments.overflow == "reject-publish"
            and arguments.max_length is not None
            and len(self.queues[queue]) >= arguments.max_length
        )


def topic_matches(binding: str, routing_key: str) -> bool:
    """Whether a topic binding (`*` one word, `#` zero or more) matches a routing key."""
    pattern, words = binding.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        return j < len(words) and pattern[i] in ("*", words[j]) and match(i + 1, j + 1)

    return match(0, 0)
