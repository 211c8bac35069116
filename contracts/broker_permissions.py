"""The RabbitMQ permissions each Sluice role needs in a vhost of its own, derived from the
pipeline, so the README's `rabbitmqctl` lines and the test that runs a pipeline under them
cannot drift apart.

RabbitMQ grants per resource (exchange or queue name) and, on topic exchanges, per routing
key. Every Sluice process declares the whole topology at start (idempotently; any of them
may come up first), and creating a queue that dead-letters needs read on that queue and write
on its dead-letter exchange (the default exchange, `amq.default`, for retry tiers). So
configure, write and read cover the namespace's names for every role alike; what differs is
the routing keys each may publish on the main exchange (topic permissions): the gateway its
uploads, webhooks and the replays of dead letters, each stage its outputs, its own job events
and heartbeats. The default exchange (retry tiers) cannot be narrowed by routing key, which is
why every consumer also checks each message's signature (contracts/message_signature.py).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import get_args

from contracts import routing
from contracts.events import EventKind
from contracts.pipeline import Pipeline

GATEWAY = "gateway"
# A routing key no publish can have: the gateway sends no dead letters.
NEVER = "^(?!)"
ANY = ".*"


@dataclass(frozen=True)
class TopicPermission:
    """Which routing keys a user may publish with (`write`) and bind (`read`) on one exchange."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class RolePermissions:
    """One role's user and its permissions in the vhost."""

    role: str
    user: str
    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...]


def _either(*keys: str) -> str:
    return "|".join(re.escape(k) for k in keys)


def _lanes(keys: list[str]) -> str:
    """A regex matching each key in either lane (`doc.parsed`, `doc.parsed.bulk`)."""
    either = _either(*keys) if len(keys) == 1 else f"({_either(*keys)})"
    return f"{either}(\\.{routing.BULK})?"


def roles(namespace: str, pipeline: Pipeline) -> tuple[RolePermissions, ...]:
    """The gateway's permissions, then each stage's (the pipeline's, then side stages')."""
    ns = re.escape(namespace)
    names = f"^{ns}(\\..+)?$"
    # Retry tiers publish through the default exchange and dead-letter back through it.
    written = f"^(amq\\.default|{ns}(\\..+)?)$"
    main = routing.exchange(namespace)
    dead = routing.dead_letter_exchange(namespace)
    inputs = [spec.input_key for spec in pipeline.processes]
    kinds = "|".join(get_args(EventKind))

    def role(name: str, user: str, publishes: str, dead_letters: str) -> RolePermissions:
        return RolePermissions(
            role=name,
            user=user,
            configure=names,
            write=written,
            read=names,
            topics=(
                # Read is checked on bindings: every process binds the whole topology.
                TopicPermission(main, publishes, ANY),
                TopicPermission(dead, dead_letters, ANY),
            ),
        )

    # Uploads and webhooks, and a dead letter replayed to whichever stage it failed in.
    gateway = role(GATEWAY, f"sluice-{GATEWAY}", f"^{_lanes(inputs)}$", NEVER)
    stages = []
    for spec in pipeline.processes:
        output = pipeline.output_key(spec.name)
        # A stage that fans out (parse: a scan's page ranges) writes to its own queue too.
        outputs = [*([output] if output else []), *([spec.input_key] if spec.fans_out else [])]
        own = [
            *([_lanes(outputs)] if outputs else []),
            f"job\\.{re.escape(spec.name)}\\.({kinds})",
            f"worker\\.{re.escape(spec.name)}",
        ]
        stages.append(role(spec.name, f"sluice-{spec.name}", f"^({'|'.join(own)})$", ANY))
    return (gateway, *stages)


def rabbitmqctl_lines(vhost: str, namespace: str, pipeline: Pipeline) -> list[str]:
    """The `rabbitmqctl` commands that give every role its permissions in `vhost`."""
    lines = []
    for r in roles(namespace, pipeline):
        v, user = shlex.quote(vhost), shlex.quote(r.user)
        quoted = " ".join(_quote(x) for x in (r.configure, r.write, r.read))
        lines.append(f"rabbitmqctl set_permissions -p {v} {user} {quoted}")
        for topic in r.topics:
            rest = " ".join(_quote(x) for x in (topic.exchange, topic.write, topic.read))
            lines.append(f"rabbitmqctl set_topic_permissions -p {v} {user} {rest}")
    return lines


def _quote(value: str) -> str:
    # Always single-quoted, so a reader sees the regex exactly as the shell passes it.
    return "'" + value.replace("'", "'\\''") + "'"
