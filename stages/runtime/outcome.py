"""How a delivery ends, as a value, and the decision table that picks it.

Every delivery ends in exactly one `Outcome`; `settle` (stages/runtime/settle.py) is the one
place that turns it into broker actions. The functions here only decide, from what the
delivery carried and how the handler ended, so the whole table reads (and is tested) as data:

| how it ended                                   | outcome                                   |
|------------------------------------------------|-------------------------------------------|
| not signed with the deployment's secret        | DeadLetter `unauthenticated_message`, no  |
|                                                | job failed (its body is not believed)     |
| body does not validate                         | DeadLetter `invalid_message`              |
| delivered `delivery_limit` times already       | DeadLetter `worker_crashed`               |
| handler returned, batch contract kept          | Done (outputs + progress event)           |
| outputs break the stage contract (batch, type) | DeadLetter `stage_contract`               |
| handler raised `Permanent`                     | DeadLetter, not retryable                 |
| handler raised `StorageFull` (a disk is full)  | Retry in the last tier, attempt not spent |
| handler raised anything else, attempts left    | Retry in the tier for its attempt         |
| ... on its last attempt                        | DeadLetter, retryable                     |
| outputs refused: the next queue is full        | Retry in the first tier, attempt not spent|
| the broker failed mid-settle                   | Requeue (redelivered; work is idempotent) |
| the runtime or a layer failed (crash guard)    | Requeue                                   |
| another delivery runs alone (isolation.py)     | Park: a copy to the back of its queue, ack|
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contracts import events
from contracts.errors import Permanent, SluiceError, StorageFull
from contracts.events import JobEvent
from contracts.messages import ChunkBatch, EmbeddedBatch, Message
from contracts.pipeline import StageSpec
from contracts.settings import StageSettings
from stages.runtime.ports import PublishRejected
from stages.runtime.reading import DeliveryContext


def error_code(error: BaseException) -> str:
    """The stable code of an error: a Sluice error's own, `internal_error` for anything else."""
    return error.code if isinstance(error, SluiceError) else "internal_error"


@dataclass(frozen=True)
class Done:
    """The handler finished: publish its outputs and the progress event, then ack."""

    outputs: Sequence[Message]
    event: JobEvent


@dataclass(frozen=True)
class Retry:
    """Park the message in the retry tier `delay_s` (a TTL queue that hands it back), then ack.

    `attempt` is the attempt that failed; `spend_attempt` is False for backpressure and for a
    full disk, which are no fault of the message and must not bring it closer to the
    dead-letter queue.
    """

    delay_s: int
    attempt: int
    spend_attempt: bool
    error: Exception

    @property
    def next_attempt(self) -> int:
        """The attempt the message carries back (`x-sluice-attempt`)."""
        return self.attempt + 1 if self.spend_attempt else self.attempt

    @property
    def code(self) -> str:
        """Why it is retried, for metrics."""
        return error_code(self.error)

    @property
    def backpressure(self) -> bool:
        """Whether it waits because the next stage's queue refused its outputs: no attempt
        failed then (the handler's work is done, only its hand-over waits)."""
        return isinstance(self.error, PublishRejected)


@dataclass(frozen=True)
class DeadLetter:
    """Copy the message to the dead-letter exchange with the reason, fail its job, then ack."""

    error: Exception
    retryable: bool

    @property
    def code(self) -> str:
        """The error code the dead letter and the job's error carry."""
        return error_code(self.error)

    @property
    def reason(self) -> str:
        """The sentence a person reads."""
        return str(self.error) or type(self.error).__name__


@dataclass(frozen=True)
class Requeue:
    """Leave the work undone: nack with requeue, so RabbitMQ delivers it again."""

    error: BaseException


@dataclass(frozen=True)
class Park:
    """Not run now, because a redelivered message runs alone (stages/runtime/isolation.py):
    a copy goes to the back of its own queue, then ack. No attempt is spent, no event sent."""


Outcome = Done | Retry | DeadLetter | Requeue | Park


@dataclass(frozen=True)
class Returned:
    """The handler returned these outputs."""

    outputs: Sequence[Message]


@dataclass(frozen=True)
class Raised:
    """The handler raised (after its in-process retries of `Transient`)."""

    error: Exception


Ended = Returned | Raised


def refuse(ctx: DeliveryContext, tuned: StageSettings) -> DeadLetter | None:
    """A delivery the handler must never see, or None when it may run."""
    if ctx.invalid is not None:
        return DeadLetter(ctx.invalid, retryable=False)
    if ctx.msg is not None and ctx.deliveries >= tuned.delivery_limit:
        crashed = Permanent(
            f"{ctx.stage}: {ctx.msg.filename} was in hand {ctx.deliveries} times when its "
            "worker died; it is set aside so the stage keeps serving other documents. "
            "Find the cause in the stage's log, then replay it (sluice dlq replay).",
            code="worker_crashed",
        )
        return DeadLetter(crashed, retryable=False)
    return None


def decide(ctx: DeliveryContext, ended: Ended, spec: StageSpec, tuned: StageSettings) -> Outcome:
    """The outcome of a delivery whose handler ran, from how the handler ended."""
    assert ctx.msg is not None, "refuse() lets no invalid message reach the handler"
    if isinstance(ended, Returned):
        broken = broken_contract(spec, ctx.msg, ended.outputs)
        if broken is not None:
            return DeadLetter(broken, retryable=False)
        return Done(ended.outputs, events.progress(spec.name, ctx.msg, ended.outputs, ctx.attempt))
    if isinstance(ended.error, Permanent):
        return DeadLetter(ended.error, retryable=False)
    if isinstance(ended.error, StorageFull):
        # Space comes back when a person frees it, maybe hours from now; until then the
        # message waits in the slowest tier as often as it takes, and is never dead-lettered
        # for it: nothing is lost once there is space again.
        return Retry(tuned.retry_delays_s[-1], ctx.attempt, False, ended.error)
    if ctx.attempt >= tuned.max_attempts:
        return DeadLetter(ended.error, retryable=True)
    return Retry(tuned.retry_delay_s(ctx.attempt), ctx.attempt, True, ended.error)


def when_settling_failed(
    outcome: Outcome, error: Exception, ctx: DeliveryContext, first_delay_s: int
) -> Outcome:
    """What to do instead when the broker did not take what `outcome` publishes (or its ack)."""
    if isinstance(outcome, Done) and isinstance(error, PublishRejected):
        # The next stage's queue is full: backpressure, not a fault of this message, so it
        # waits in the first retry tier without spending an attempt.
        return Retry(first_delay_s, ctx.attempt, spend_attempt=False, error=error)
    if isinstance(outcome, Park) and isinstance(error, PublishRejected):
        # Its own queue is full: it waits in the first retry tier instead, which has no
        # limit (handed back unsettled, it would count as a failed delivery).
        return Retry(first_delay_s, ctx.attempt, spend_attempt=False, error=error)
    # Anything else (the broker went away mid-message): leave it unacked, to be redelivered.
    return Requeue(error)


def broken_contract(spec: StageSpec, msg: Message, outputs: Sequence[Message]) -> Permanent | None:
    """What a stage's outputs break of the contract `StageSpec` documents, or None."""
    produces = spec.produces
    if produces is None and outputs:
        return _contract(spec, f"returned {len(outputs)} message(s) but declares it produces none")
    # A stage that fans out also hands work of its own input type back to its own queue.
    made = (produces, spec.consumes) if produces and spec.fans_out else produces
    wrong = next((o for o in outputs if made and not isinstance(o, made)), None)
    if wrong is not None and produces is not None:
        return _contract(
            spec,
            f"returned a {type(wrong).__name__} but declares it produces {produces.__name__}",
        )
    if isinstance(msg, ChunkBatch | EmbeddedBatch):
        given = (msg.batch_index, msg.batch_count)
        for out in outputs:
            if isinstance(out, ChunkBatch | EmbeddedBatch) and (
                (out.batch_index, out.batch_count) != given
            ):
                return _contract(
                    spec,
                    f"was given batch {given[0]} of {given[1]} and returned batch "
                    f"{out.batch_index} of {out.batch_count}; a stage must hand on each batch "
                    "with the batch_index and batch_count it received, or the index never "
                    "sees the document whole",
                )
    return None


def _contract(spec: StageSpec, what: str) -> Permanent:
    return Permanent(
        f"stage {spec.name!r} broke the stage contract (contracts/pipeline.py StageSpec): it "
        f"{what}. Fix the stage module, then replay its dead letters (sluice dlq replay).",
        code="stage_contract",
    )
