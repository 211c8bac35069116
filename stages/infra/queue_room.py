"""Why RabbitMQ nacked a publish: a queue at its length limit, or a queue with no leader.

The broker says only "nack" in both cases. A full `reject-publish` queue is backpressure (the
gateway answers 429); a quorum queue whose leader was on a node just lost nacks too until the
survivors have elected a new one, usually within a second or two, and that is the broker
being briefly unavailable (503), not the pipeline being full.
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPError

from contracts.topology import QueueSpec, Topology

# A passive declare answers at once from any node; one that hangs says enough.
CHECK_TIMEOUT_S = 5.0


def length_limited_targets(topo: Topology, exchange: str, routing_key: str) -> list[QueueSpec]:
    """The queues with a length limit that a publish to `routing_key` on `exchange` reaches
    (`""` is the default exchange, which routes by queue name)."""
    return [
        spec
        for spec in topo.queues
        if spec.arguments.max_length is not None
        and (
            (exchange == "" and spec.name == routing_key)
            or (spec.exchange == exchange and routing_key in spec.binding_keys)
        )
    ]


async def at_length_limit(
    connection: AbstractRobustConnection, topo: Topology, exchange: str, routing_key: str
) -> bool:
    """Whether a queue this publish reaches holds its `x-max-length` of ready messages now;
    False when none does or the broker cannot say (it is then the one in trouble)."""
    targets = length_limited_targets(topo, exchange, routing_key)
    if not targets:
        return False
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            channel = await connection.channel(publisher_confirms=False)
            try:
                for spec in targets:
                    # Not robust: only the broker's answer now is of use, never a cached one.
                    queue = await channel.declare_queue(spec.name, passive=True, robust=False)
                    ready = queue.declaration_result.message_count or 0
                    if ready >= (spec.arguments.max_length or 0):
                        return True
            finally:
                with contextlib.suppress(AMQPError, ConnectionError, RuntimeError):
                    await channel.close()
    except (TimeoutError, AMQPError, ConnectionError, RuntimeError):
        return False
    return False
