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
# How often a replicated dead letter may be handed back by `sluice dlq` scans before
# RabbitMQ drops it (a quorum queue counts each; 4.x has no "unlimited" that 3.10 knows).
DEAD_LETTER_SCANS = 1_000_000


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
    # Quorum queues only: how many nodes hold a replica, and whether a dead letter is kept
    # until its target queue confirmed it (at-least-once) rather than sent once and forgotten.
    quorum_initial_group_size: int | None = None
    dead_letter_strategy: Literal["at-most-once", "at-least-once"] | None = None

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
    # Set on a cluster: every durable queue gets this many replicas (README "A RabbitMQ
    # cluster"). Unset, the arguments stay as they always were, so queues that already exist
    # on one node are redeclared as they are.
    replicas = settings.quorum_initial_group_size
    at_least_once: Literal["at-least-once"] | None = "at-least-once" if replicas else None
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
                        quorum_initial_group_size=replicas,
                        dead_letter_strategy=at_least_once,
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
                        arguments=_retry_tier(delay_s, stage_queue, replicas),
                    )
                )
    queues.append(
        QueueSpec(
            name=routing.dead_letter_queue(ns),
            arguments=_dead_letters(replicas),
            exchange=dlx,
            binding_keys=("#",),
        )
    )
    queues.append(
        QueueSpec(
            name=routing.tracker_queue(ns),
            arguments=QueueArguments(queue_type="quorum", quorum_initial_group_size=replicas),
            exchange=main,
            binding_keys=(routing.JOB_EVENTS,),
        )
    )
    return Topology(
        exchanges=(ExchangeSpec(main, "topic"), ExchangeSpec(dlx, "topic")),
        queues=tuple(queues),
    )


def _retry_tier(delay_s: int, stage_queue: str, replicas: int | None) -> QueueArguments:
    """A retry tier: classic on one node; on a cluster a quorum queue (message TTLs need
    RabbitMQ 3.10) that hands its messages back at least once, so none is lost in a failover."""
    if replicas is None:
        return QueueArguments(
            message_ttl_ms=delay_s * 1000,
            dead_letter_exchange="",
            dead_letter_routing_key=stage_queue,
        )
    return QueueArguments(
        queue_type="quorum",
        quorum_initial_group_size=replicas,
        message_ttl_ms=delay_s * 1000,
        dead_letter_exchange="",
        dead_letter_routing_key=stage_queue,
        dead_letter_strategy="at-least-once",
        # At-least-once dead-lettering needs it; a retry tier has no length limit to reach.
        overflow="reject-publish",
    )


def _dead_letters(replicas: int | None) -> QueueArguments:
    """The dead-letter queue: classic on one node; on a cluster a quorum queue."""
    if replicas is None:
        # Classic, not quorum: finding one job's dead letters hands the others back, and a
        # quorum queue would count each hand-back as a delivery (4.x drops at 20 by default).
        return QueueArguments(queue_type="classic")
    # A classic queue would live on one node and go with it; the hand-backs are counted, so
    # the limit is set far beyond any number of scans.
    return QueueArguments(
        queue_type="quorum",
        quorum_initial_group_size=replicas,
        delivery_limit=DEAD_LETTER_SCANS,
    )
