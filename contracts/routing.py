"""Routing keys on the topic exchange, and the names of exchanges and queues, defined once.

Every stage has two lanes: `interactive` (a person waits) and `bulk` (an import). A lane is a
queue of its own per stage, fed by its own routing key: the interactive lane keeps the plain
names (`doc.uploaded`, `sluice.stage.parse`), the bulk lane adds `.bulk` to both. A message
says its lane in its `priority` field, and every hop keeps it.
"""

from __future__ import annotations

from typing import Literal

Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")
INTERACTIVE: Lane = "interactive"
BULK: Lane = "bulk"

# Data plane: each key feeds the next stage's queue.
DOC_UPLOADED = "doc.uploaded"
DOC_PARSED = "doc.parsed"
DOC_CHUNKED = "doc.chunked"
DOC_EMBEDDED = "doc.embedded"
# The optional enrich stage sits between chunk and embed.
DOC_TO_ENRICH = "doc.enrich"


def lane_key(key: str, lane: Lane) -> str:
    """The routing key of `key`'s lane: `doc.uploaded` stays for interactive work,
    `doc.uploaded.bulk` is the bulk lane's."""
    return key if lane == INTERACTIVE else f"{key}.{lane}"


def stage_input_key(stage: str) -> str:
    """The routing key that feeds a plug-in stage's queue (built-in ones keep their own)."""
    return f"doc.{stage}"


# Control plane: small status events, `job.<stage>.<kind>`, read by the gateway's tracker.
JOB_EVENTS = "job.#"
# Worker heartbeats, `worker.<stage>`, read by every gateway for `GET /v1/pipeline`.
WORKER_HEARTBEATS = "worker.#"
# Webhook deliveries: the gateway's tracker publishes one when a job with a callback ends.
WEBHOOK = "notify.webhook"


def heartbeat_key(stage: str) -> str:
    """The routing key of one stage's worker heartbeats."""
    return f"worker.{stage}"


def job_event_key(stage: str, kind: str) -> str:
    """The routing key of one job event."""
    return f"job.{stage}.{kind}"


def exchange(namespace: str) -> str:
    """The topic exchange every stage publishes to."""
    return namespace


def dead_letter_exchange(namespace: str) -> str:
    """Where messages that cannot be processed go, with the reason in their headers."""
    return f"{namespace}.dead-letter"


def dead_letter_queue(namespace: str) -> str:
    """The one queue holding every dead letter, for `sluice dlq` and job retry."""
    return f"{namespace}.dead-letter"


def stage_queue(namespace: str, stage: str, lane: Lane = INTERACTIVE) -> str:
    """The work queue of one stage's lane."""
    base = f"{namespace}.stage.{stage}"
    return base if lane == INTERACTIVE else f"{base}.{lane}"


def retry_queue(namespace: str, stage: str, delay_s: int, lane: Lane = INTERACTIVE) -> str:
    """A delay queue that hands a message back to its stage's lane after `delay_s` seconds."""
    base = f"{namespace}.retry.{stage}"
    return f"{base}.{delay_s}s" if lane == INTERACTIVE else f"{base}.{lane}.{delay_s}s"


def heartbeat_queue(namespace: str, gateway_id: str) -> str:
    """One gateway's own queue of worker heartbeats (every gateway hears every worker)."""
    return f"{namespace}.heartbeats.{gateway_id}"


def tracker_queue(namespace: str) -> str:
    """The queue the gateway's tracker reads job events from."""
    return f"{namespace}.tracker"
