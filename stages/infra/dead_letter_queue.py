"""Reading and replaying the dead-letter queue, for job retry and `sluice dlq`.

Dead letters are taken with basic.get and held unacked while the queue is scanned, so each
is seen once; those not replayed go back to the queue when the scanning channel closes. A
replayed letter goes back to its stage in its own lane: the one its body's `priority` names,
else the one its routing key ends in (`doc.chunked.bulk`), else interactive. It keeps the
signature it had (contracts/message_signature.py): replay never vouches for a message.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError

from contracts import routing
from contracts.errors import Transient
from contracts.message_signature import SIGNATURE_HEADER
from contracts.messages import StageName
from contracts.pipeline import Pipeline
from contracts.routing import BULK, INTERACTIVE, LANES, Lane
from contracts.topology import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    JOB_HEADER,
    STAGE_HEADER,
    binding_key,
)
from stages.infra import tracing
from stages.infra.broker import Broker, header_int

DEAD_AT_HEADER = "x-sluice-dead-at"
_SCAN_LIMIT = 100_000


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message and why it is there."""

    job_id: str | None
    stage: StageName | None
    code: str
    reason: str
    attempts: int
    dead_at: float | None


def describe(delivery: AbstractIncomingMessage, pipeline: Pipeline) -> DeadLetter:
    """What a person needs to know about a dead letter, from its headers."""
    headers: dict[str, Any] = dict(delivery.headers or {})
    stage = headers.get(STAGE_HEADER) or pipeline.stage_of_key(
        _plain_key(delivery.routing_key or "")
    )
    # Without our headers the broker dead-lettered it: its worker died on it too many times.
    code = str(headers.get(ERROR_CODE_HEADER) or "worker_crashed")
    reason = str(headers.get(ERROR_HEADER) or "the message crashed its worker on every delivery")
    dead_at = headers.get(DEAD_AT_HEADER)
    return DeadLetter(
        job_id=str(headers.get(JOB_HEADER) or "") or None,
        # A side stage's letters (a webhook that never got through) replay like any other.
        stage=stage if isinstance(stage, str) and stage in _process_names(pipeline) else None,
        code=code,
        reason=reason,
        attempts=header_int(headers, ATTEMPT_HEADER, header_int(headers, "x-delivery-count", 1)),
        dead_at=float(dead_at) if isinstance(dead_at, int | float) else None,
    )


@asynccontextmanager
async def _dead_letter_queue(broker: Broker) -> AsyncIterator[AbstractQueue]:
    """The dead-letter queue on a channel of its own; broker trouble becomes `Transient`."""
    try:
        channel = await broker.connection.channel()
        try:
            yield await channel.get_queue(routing.dead_letter_queue(broker.settings.namespace))
        finally:
            await channel.close()
    except (AMQPError, ConnectionError) as exc:
        raise Transient(f"reading the dead-letter queue failed: {exc!r}") from exc


async def replay_each(
    broker: Broker, where: Callable[[DeadLetter], bool]
) -> AsyncIterator[DeadLetter]:
    """Send each dead letter `where` accepts back to the stage it failed in; yield it once sent."""
    ns = broker.settings.namespace
    async with _dead_letter_queue(broker) as queue:
        # Only the letters there now: one that fails again at once (an unsigned one is
        # refused unread) comes back behind them, for the next replay, not round again.
        present = queue.declaration_result.message_count or 0
        for _ in range(min(present, _SCAN_LIMIT)):
            delivery = await queue.get(no_ack=False, fail=False)
            if delivery is None:
                break
            letter = describe(delivery, broker.settings.pipeline)
            if letter.stage is None or not where(letter):
                continue
            # The signature goes back as it came, never made anew: a letter that was not
            # signed by a Sluice process (`unauthenticated_message`) stays untrusted.
            headers = {
                k: v
                for k, v in (delivery.headers or {}).items()
                if (k == SIGNATURE_HEADER or not k.startswith("x-sluice-"))
                and k not in ("x-death", "x-delivery-count")
            }
            # The replay runs in the replaying request's trace, linked to the original one.
            with tracing.tracer.start_as_current_span(
                f"replay {letter.stage}",
                links=tracing.link_to(delivery.headers),
                attributes={"sluice.job_id": letter.job_id or "", "sluice.replay": True},
            ):
                lane = lane_of(delivery.body, delivery.routing_key)
                await broker.publish_raw(
                    routing.exchange(ns),
                    binding_key(
                        broker.settings,
                        letter.stage,
                        lane if broker.settings.lanes else INTERACTIVE,
                    ),
                    delivery.body,
                    headers={**headers, ATTEMPT_HEADER: 1},
                    message_id=delivery.message_id,
                )
            await delivery.ack()
            yield letter


def _process_names(pipeline: Pipeline) -> set[str]:
    return {spec.name for spec in pipeline.processes}


async def replay(
    broker: Broker,
    *,
    job_id: str | None = None,
    stage: StageName | None = None,
    pipeline_only: bool = False,
) -> int:
    """Send matching dead letters back to the stage they failed in, with fresh attempts;
    `pipeline_only` leaves side stages' letters (a job retry must not re-send an old
    webhook carrying the job as it was)."""
    pipeline = broker.settings.pipeline

    def matches(letter: DeadLetter) -> bool:
        if pipeline_only and not (letter.stage and pipeline.has(letter.stage)):
            return False
        return (not job_id or letter.job_id == job_id) and (not stage or letter.stage == stage)

    return len([letter async for letter in replay_each(broker, matches)])


async def list_dead_letters(broker: Broker) -> list[DeadLetter]:
    """Every dead letter, oldest first; the queue is left as it was."""
    letters: list[DeadLetter] = []
    async with _dead_letter_queue(broker) as queue:
        for _ in range(_SCAN_LIMIT):
            delivery = await queue.get(no_ack=False, fail=False)
            if delivery is None:
                break
            letters.append(describe(delivery, broker.settings.pipeline))
    return letters


def lane_of(body: bytes, routing_key: str | None) -> Lane:
    """The lane a dead letter came from: its body's `priority`, else its routing key's."""
    try:
        priority = json.loads(body).get("priority")
    except (ValueError, AttributeError):
        priority = None
    for lane in LANES:
        if priority == lane:
            return lane
    return BULK if (routing_key or "").endswith(f".{BULK}") else INTERACTIVE


def _plain_key(routing_key: str) -> str:
    """A routing key without its lane's suffix (`doc.chunked.bulk` → `doc.chunked`)."""
    suffix = f".{BULK}"
    return routing_key[: -len(suffix)] if routing_key.endswith(suffix) else routing_key


def now_header() -> dict[str, int]:
    """The header that dates a dead letter."""
    return {DEAD_AT_HEADER: int(time.time())}
