"""Reading and replaying the dead-letter queue, for job retry and `sluice dlq`.

Dead letters are taken with basic.get and held unacked while the queue is scanned, so each
is seen once; those not replayed go back to the queue when the scanning channel closes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from contracts import routing
from contracts.messages import INPUT_OF, STAGES, StageName
from contracts.topology import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    JOB_HEADER,
    STAGE_HEADER,
    binding_key,
)
from stages.broker import Broker, header_int

DEAD_AT_HEADER = "x-sluice-dead-at"
_STAGE_OF_KEY: dict[str, StageName] = {INPUT_OF[s].routing_key: s for s in STAGES}
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


def describe(delivery: AbstractIncomingMessage) -> DeadLetter:
    """What a person needs to know about a dead letter, from its headers."""
    headers: dict[str, Any] = dict(delivery.headers or {})
    stage = headers.get(STAGE_HEADER) or _STAGE_OF_KEY.get(delivery.routing_key or "")
    # Without our headers the broker dead-lettered it: its worker died on it too many times.
    code = str(headers.get(ERROR_CODE_HEADER) or "worker_crashed")
    reason = str(headers.get(ERROR_HEADER) or "the message crashed its worker on every delivery")
    dead_at = headers.get(DEAD_AT_HEADER)
    return DeadLetter(
        job_id=str(headers.get(JOB_HEADER) or "") or None,
        stage=stage if stage in STAGES else None,
        code=code,
        reason=reason,
        attempts=header_int(headers, ATTEMPT_HEADER, header_int(headers, "x-delivery-count", 1)),
        dead_at=float(dead_at) if isinstance(dead_at, int | float) else None,
    )


async def replay(
    broker: Broker, *, job_id: str | None = None, stage: StageName | None = None
) -> int:
    """Send matching dead letters back to the stage they failed in, with fresh attempts."""
    ns = broker.settings.namespace
    channel = await broker.connection.channel()
    replayed = 0
    try:
        queue = await channel.get_queue(routing.dead_letter_queue(ns))
        for _ in range(_SCAN_LIMIT):
            delivery = await queue.get(no_ack=False, fail=False)
            if delivery is None:
                break
            letter = describe(delivery)
            if letter.stage is None:
                continue
            if (job_id and letter.job_id != job_id) or (stage and letter.stage != stage):
                continue
            headers = {
                k: v
                for k, v in (delivery.headers or {}).items()
                if not k.startswith("x-sluice-") and k not in ("x-death", "x-delivery-count")
            }
            await broker.publish_raw(
                routing.exchange(ns),
                binding_key(letter.stage),
                delivery.body,
                headers={**headers, ATTEMPT_HEADER: 1},
                message_id=delivery.message_id,
            )
            await delivery.ack()
            replayed += 1
    finally:
        await channel.close()
    return replayed


async def list_dead_letters(broker: Broker) -> list[DeadLetter]:
    """Every dead letter, oldest first; the queue is left as it was."""
    channel = await broker.connection.channel()
    letters: list[DeadLetter] = []
    try:
        queue = await channel.get_queue(routing.dead_letter_queue(broker.settings.namespace))
        for _ in range(_SCAN_LIMIT):
            delivery = await queue.get(no_ack=False, fail=False)
            if delivery is None:
                break
            letters.append(describe(delivery))
    finally:
        await channel.close()
    return letters


def now_header() -> dict[str, int]:
    """The header that dates a dead letter."""
    return {DEAD_AT_HEADER: int(time.time())}
