"""A delivery as the runtime reads it, once, before any layer or decision looks at it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from pydantic import ValidationError

from contracts.errors import Permanent
from contracts.message_signature import UNAUTHENTICATED, MessageSigner
from contracts.messages import ID_PATTERN, Message
from contracts.routing import INTERACTIVE, Lane
from contracts.topology import ATTEMPT_HEADER
from stages.infra.broker import header_int
from stages.runtime.isolation import deaths
from stages.runtime.ports import Delivery

if TYPE_CHECKING:
    from stages.runtime.outcome import Outcome

# Set by quorum queues on redelivery: how often the message was handed out and not settled.
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass
class DeliveryContext:
    """One delivery in hand: where it came from, what it carries, since when, and how it ended.

    Exactly one of `msg` (the validated message) and `invalid` (why it did not validate) is set.
    A delivery that is not `authenticated` (unsigned, or signed with another secret) is never
    parsed: nothing it says is believed, not even the job it names.
    `settled` is written once, by `settle`, so no layer can settle a delivery twice. `lane` is
    the lane of the queue it was consumed from (a retry goes back to that lane's queue).
    """

    stage: str
    queue: str
    delivery: Delivery
    # Our own attempt counter (1 on first delivery); RabbitMQ 4.x no longer counts in x-death.
    attempt: int
    # How often it was handed out before without being settled (a worker died on it), over
    # every copy of it (stages/runtime/isolation.py).
    deliveries: int
    msg: Message | None
    invalid: Permanent | None = None
    lane: Lane = INTERACTIVE
    authenticated: bool = True
    started_s: float = field(default_factory=time.perf_counter)
    settled: Outcome | None = None

    @cached_property
    def job_id(self) -> str | None:
        """The job it belongs to, even when the body is broken but names one."""
        if self.msg:
            return self.msg.job_id
        return _peek(self.delivery.body, "job_id") if self.authenticated else None

    @cached_property
    def document_id(self) -> str | None:
        """The document it belongs to, even when the body is broken but names one."""
        if self.msg:
            return self.msg.document_id
        return _peek(self.delivery.body, "document_id") if self.authenticated else None

    def elapsed_s(self) -> float:
        """Seconds since the delivery was taken in hand."""
        return time.perf_counter() - self.started_s


def read_delivery(
    delivery: Delivery,
    stage: str,
    queue: str,
    model: type[Message],
    lane: Lane = INTERACTIVE,
    *,
    signer: MessageSigner,
    topic: str,
) -> DeliveryContext:
    """Check the delivery was signed for `topic` by a Sluice process, read the headers the
    runtime keeps and validate the body as `model`; never raises."""
    headers = delivery.headers
    # Headers are not signed: an attempt below 1 from anyone is the first (events need >= 1).
    attempt = max(1, header_int(headers, ATTEMPT_HEADER, 1))
    deliveries = deaths(headers)
    if not signer.verify_headers(topic, delivery.body, headers):
        forged = Permanent(
            f"{stage}: the message on {queue} is not signed with this deployment's message "
            "secret; it was not read. If a Sluice process sent it, give every process the same "
            "SLUICE_MESSAGE_SECRET, then replay it (sluice dlq replay).",
            code=UNAUTHENTICATED,
        )
        return DeliveryContext(
            stage, queue, delivery, attempt, deliveries, None, forged, lane, authenticated=False
        )
    try:
        msg = model.model_validate_json(delivery.body)
    except ValidationError as exc:
        invalid = Permanent(
            f"{stage}: the message is not a valid {model.__name__}: {_first_error(exc)}",
            code="invalid_message",
        )
        return DeliveryContext(stage, queue, delivery, attempt, deliveries, None, invalid, lane)
    return DeliveryContext(stage, queue, delivery, attempt, deliveries, msg, lane=lane)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def _peek(body: bytes, name: str) -> str | None:
    """An id field of a JSON body that failed validation, if it has a well-formed one."""
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and re.fullmatch(ID_PATTERN, value) else None
