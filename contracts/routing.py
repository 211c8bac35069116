"""Routing keys on the topic exchange, and the names of exchanges and queues, defined once."""

from __future__ import annotations

# Data plane: each key feeds the next stage's queue.
DOC_UPLOADED = "doc.uploaded"
DOC_PARSED = "doc.parsed"
DOC_CHUNKED = "doc.chunked"
DOC_EMBEDDED = "doc.embedded"
# The optional enrich stage sits between chunk and embed.
DOC_TO_ENRICH = "doc.enrich"


def stage_input_key(stage: str) -> str:
    """The routing key that feeds a plug-in stage's queue (built-in ones keep their own)."""
    return f"doc.{stage}"


# Control plane: small status events, `job.<stage>.<kind>`, read by the gateway's tracker.
JOB_EVENTS = "job.#"


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


def stage_queue(namespace: str, stage: str) -> str:
    """The work queue of one stage."""
    return f"{namespace}.stage.{stage}"


def retry_queue(namespace: str, stage: str, delay_s: int) -> str:
    """A delay queue that hands a message back to its stage after `delay_s` seconds."""
    return f"{namespace}.retry.{stage}.{delay_s}s"


def tracker_queue(namespace: str) -> str:
    """The queue the gateway's tracker reads job events from."""
    return f"{namespace}.tracker"
