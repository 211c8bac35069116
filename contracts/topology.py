"""Exchanges, queues and bindings as values; the runtime's declarer turns them into RabbitMQ.

Stage queues are durable quorum queues with an explicit delivery limit (4.x defaults it to 20,
3.10 to none) and a dead-letter exchange, so a message that keeps crashing its worker ends in
the dead-letter queue. Length limits with `reject-publish` make a full pipeline push back on
publishers instead of growing without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from contracts import routing
from contracts.messages import StageName
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
class QueueArguments:
    """A queue's `x-` arguments as typed fields: a misspelt one is a type error, not a
    silently ignored declaration. `None` leaves an argument out."""

    queue_type: Literal["quorum", "classic"] | None = None
    delivery_limit: int | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    max_length: int | None = None
    overflow: Literal["reject-publish", "drop-head"] | None = None
    message_ttl_ms: int | None = None

    def as_amqp(self) -> dict[str, str | int]:
        """The arguments as RabbitMQ reads them (`x-delivery-limit`, ...)."""
        names = {"message_ttl_ms": "x-message-ttl"}
        return {
            names.get(f.name, "x-" + f.name.replace("_", "-")): value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, its arguments, and the routing keys that bind it to an exchange."""

    name: str
    arguments: QueueArguments = QueueArguments()
    exchange: str | None = None
    binding_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Everything Sluice declares on the broker."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]

    def queue(self, name: str) -> QueueSpec:
        """One queue's declaration."""
        return next(q for q in self.queues if q.name == name)


def binding_key(settings: Settings, stage: StageName, lane: routing.Lane = "interactive") -> str:
    """The routing key a stage's lane consumes."""
    return routing.lane_key(settings.pipeline.spec(stage).input_key, lane)


def topology(settings: Settings) -> Topology:
    """The whole topology for one namespace, built from the pipeline and its settings."""
    ns = settings.namespace
    main = routing.exchange(ns)
    dlx = routing.dead_letter_exchange(ns)
    queues: list[QueueSpec] = []
    for spec in settings.pipeline.processes:
        tuned = settings.stage(spec.name)
        # A queue per lane (no message priorities: 3.10's quorum queues have none), each
        # with its own retry tiers, so a retried message comes back to its own lane.
        for lane in routing.LANES:
            stage_queue = routing.stage_queue(ns, spec.name, lane)
            queues.append(
                QueueSpec(
                    name=stage_queue,
                    arguments=QueueArguments(
                        queue_type="quorum",
                        delivery_limit=tuned.delivery_limit,
                        dead_letter_exchange=dlx,
                        max_length=settings.queue_max_length,
                        overflow="reject-publish",
                    ),
                    exchange=main,
                    binding_keys=(routing.lane_key(spec.input_key, lane),),
                )
            )
            for delay_s in tuned.retry_delays_s:
                # A retry tier holds a message for its TTL, then dead-letters it straight back
                # to the stage queue through the default exchange: no consumer ever sleeps.
                queues.append(
                    QueueSpec(
                        name=routing.retry_queue(ns, spec.name, delay_s, lane),
                        arguments=QueueArguments(
                            message_ttl_ms=delay_s * 1000,
                            dead_letter_exchange="",
                            dead_letter_routing_key=stage_queue,
                        ),
                    )
                )
    queues.append(
        QueueSpec(
            # Classic, not quorum: finding one job's dead letters hands the others back, and a
            # quorum queue would count each hand-back as a delivery (4.x drops at 20 by default).
            name=routing.dead_letter_queue(ns),
            arguments=QueueArguments(queue_type="classic"),
            exchange=dlx,
            binding_keys=("#",),
        )
    )
    queues.append(
        QueueSpec(
            name=routing.tracker_queue(ns),
            arguments=QueueArguments(queue_type="quorum"),
            exchange=main,
            binding_keys=(routing.JOB_EVENTS,),
        )
    )
    return Topology(
        exchanges=(ExchangeSpec(main, "topic"), ExchangeSpec(dlx, "topic")),
        queues=tuple(queues),
    )
