"""Exchanges, queues and bindings as values; the runtime's declarer turns them into RabbitMQ.

Stage queues are durable quorum queues with an explicit delivery limit (4.x defaults it to 20,
3.10 to none) and a dead-letter exchange, so a message that keeps crashing its worker ends in
the dead-letter queue. Length limits with `reject-publish` make a full pipeline push back on
publishers instead of growing without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from contracts import routing
from contracts.messages import INPUT_OF, STAGES, StageName
from contracts.settings import Settings

# Headers the runtime sets on messages; the attempt counter is ours because 4.x no longer
# counts republished messages in `x-death`.
ATTEMPT_HEADER = "x-sluice-attempt"
STAGE_HEADER = "x-sluice-stage"
ERROR_CODE_HEADER = "x-sluice-error-code"
ERROR_HEADER = "x-sluice-error"
JOB_HEADER = "x-sluice-job-id"


@dataclass(frozen=True)
class ExchangeSpec:
    """A durable exchange."""

    name: str
    type: Literal["topic", "fanout", "direct"]


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, its arguments, and the routing keys that bind it to an exchange."""

    name: str
    arguments: dict[str, str | int] = field(default_factory=dict)
    exchange: str | None = None
    binding_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Everything Sluice declares on the broker."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]


def binding_key(stage: StageName) -> str:
    """The routing key a stage consumes."""
    return INPUT_OF[stage].routing_key


def topology(settings: Settings) -> Topology:
    """The whole topology for one namespace, built from the stage declarations and settings."""
    ns = settings.namespace
    main = routing.exchange(ns)
    dlx = routing.dead_letter_exchange(ns)
    queues: list[QueueSpec] = []
    for stage in STAGES:
        stage_queue = routing.stage_queue(ns, stage)
        queues.append(
            QueueSpec(
                name=stage_queue,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": settings.delivery_limit,
                    "x-dead-letter-exchange": dlx,
                    "x-max-length": settings.queue_max_length,
                    "x-overflow": "reject-publish",
                },
                exchange=main,
                binding_keys=(binding_key(stage),),
            )
        )
        for delay_s in settings.retry_delays_s:
            # A retry tier holds a message for its TTL, then dead-letters it straight back to
            # the stage queue through the default exchange: no consumer ever sleeps.
            queues.append(
                QueueSpec(
                    name=routing.retry_queue(ns, stage, delay_s),
                    arguments={
                        "x-message-ttl": delay_s * 1000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": stage_queue,
                    },
                )
            )
    queues.append(
        QueueSpec(
            # Classic, not quorum: finding one job's dead letters hands the others back, and a
            # quorum queue would count each hand-back as a delivery (4.x drops at 20 by default).
            name=routing.dead_letter_queue(ns),
            arguments={"x-queue-type": "classic"},
            exchange=dlx,
            binding_keys=("#",),
        )
    )
    queues.append(
        QueueSpec(
            name=routing.tracker_queue(ns),
            arguments={"x-queue-type": "quorum"},
            exchange=main,
            binding_keys=(routing.JOB_EVENTS,),
        )
    )
    return Topology(
        exchanges=(ExchangeSpec(main, "topic"), ExchangeSpec(dlx, "topic")),
        queues=tuple(queues),
    )
