"""The one settle point: an `Outcome` becomes broker actions, ending with ack or nack.

Every branch acks only after what it publishes is confirmed (at-least-once); the progress
events of deliveries finished together share one message (stages/runtime/event_batcher.py).
When the broker does not take a publish, the outcome is decided again (`when_settling_failed`)
and that one is carried out instead: refused outputs wait in a retry tier, anything else is
requeued.

Work keeps its lane here, whatever the stage did: outputs are stamped with their input's
`priority` (so a stage, built-in or plugged in, cannot move a job to another lane), a retry
waits in the tier of the lane it was consumed from, and a dead letter keeps its routing key.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from contracts import events, routing
from contracts.events import JobError, JobEvent
from contracts.messages import Message
from contracts.settings import Settings
from contracts.topology import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    JOB_HEADER,
    STAGE_HEADER,
)
from stages.infra.dead_letter_queue import now_header
from stages.runtime.event_batcher import EventBatcher
from stages.runtime.isolation import moved_headers
from stages.runtime.outcome import (
    DeadLetter,
    Done,
    Outcome,
    Park,
    Requeue,
    Retry,
    when_settling_failed,
)
from stages.runtime.ports import BrokerPort
from stages.runtime.reading import DeliveryContext

# Dead-letter reasons ride in a header; a whole traceback there helps nobody.
_REASON_CHARS = 1000


class Settler:
    """Settles the deliveries of one stage on one broker."""

    def __init__(self, broker: BrokerPort, settings: Settings, stage: str) -> None:
        self.broker = broker
        self.stage = stage
        self.namespace = settings.namespace
        self.first_delay_s = settings.stage(stage).retry_delays_s[0]
        self.pipeline = settings.pipeline
        self.input_key = settings.pipeline.spec(stage).input_key
        # Progress events of deliveries finished together go out as one message.
        self.progress = EventBatcher(broker, stage)

    async def settle(self, ctx: DeliveryContext, outcome: Outcome) -> Outcome:
        """Carry out `outcome` and ack, or nack with requeue; returns the outcome carried out."""
        if ctx.settled is not None:
            raise RuntimeError(f"{self.stage}: a delivery was settled twice ({ctx.settled})")
        while not isinstance(outcome, Requeue):
            try:
                await self._publish(ctx, outcome)
                await ctx.delivery.ack()
                break
            except Exception as exc:
                outcome = when_settling_failed(outcome, exc, ctx, self.first_delay_s)
        if isinstance(outcome, Requeue):
            # A nack that fails means the channel is gone: the broker requeues it anyway.
            with contextlib.suppress(Exception):
                await ctx.delivery.nack(requeue=True)
        ctx.settled = outcome
        return outcome

    async def _publish(
        self, ctx: DeliveryContext, outcome: Done | Retry | DeadLetter | Park
    ) -> None:
        """What `outcome` sends before the ack, each publish confirmed."""
        if isinstance(outcome, Done):
            assert ctx.msg is not None, "only a handled message ends Done"
            outputs = [_in_lane(out, ctx.msg) for out in outcome.outputs]
            # Confirmed together, in one round trip; the ack waits for both. A progress event
            # confirmed beside outputs the broker refused only runs ahead of the retry that
            # publishes them again (units count once).
            await asyncio.gather(
                *(
                    self.broker.publish(out, self.pipeline.key_of_output(self.stage, out))
                    for out in outputs
                ),
                self.progress.publish([outcome.event]),
            )
        elif isinstance(outcome, Retry):
            await asyncio.gather(
                self.broker.publish_raw(
                    "",
                    routing.retry_queue(self.namespace, self.stage, outcome.delay_s, ctx.lane),
                    ctx.delivery.body,
                    headers={**_moved_headers(ctx), ATTEMPT_HEADER: outcome.next_attempt},
                    message_id=ctx.delivery.message_id,
                ),
                *(self.broker.publish(event) for event in self._retrying_event(ctx, outcome)),
            )
        elif isinstance(outcome, Park):
            # Straight back to the queue it came from (its lane's), behind what waits there.
            await self.broker.publish_raw(
                "",
                ctx.queue,
                ctx.delivery.body,
                headers=_moved_headers(ctx),
                message_id=ctx.delivery.message_id,
            )
        else:
            await self._dead_letter(ctx, outcome)

    def _retrying_event(self, ctx: DeliveryContext, outcome: Retry) -> list[JobEvent]:
        """The `retrying` event of an attempt that failed (a full disk's too), so the job
        shows its attempts and last error. Nothing for backpressure: a full next queue is no
        failed attempt (and the broker that refused the outputs needs no more messages)."""
        if outcome.backpressure or ctx.msg is None:
            return []
        error = JobError(
            stage=self.stage,
            code=outcome.code,
            message=(str(outcome.error) or type(outcome.error).__name__)[:_REASON_CHARS],
            retryable=True,
        )
        return [events.retrying(self.stage, ctx.msg, error, outcome.attempt)]

    async def _dead_letter(self, ctx: DeliveryContext, outcome: DeadLetter) -> None:
        """The dead letter first, then the `failed` event: a job that shows `failed` can
        always be replayed from its dead letters."""
        await self.broker.publish_raw(
            routing.dead_letter_exchange(self.namespace),
            # The key it came with names its lane too (`doc.chunked.bulk`), for replay.
            ctx.delivery.routing_key or routing.lane_key(self.input_key, ctx.lane),
            ctx.delivery.body,
            headers={
                **_headers(ctx),
                STAGE_HEADER: self.stage,
                ERROR_CODE_HEADER: outcome.code,
                ERROR_HEADER: outcome.reason[:_REASON_CHARS],
                ATTEMPT_HEADER: ctx.attempt,
                JOB_HEADER: ctx.job_id or "",
                **now_header(),
            },
            message_id=ctx.delivery.message_id,
        )
        event = self._failed_event(ctx, outcome)
        if event is not None:
            await self.broker.publish(event)

    def _failed_event(self, ctx: DeliveryContext, outcome: DeadLetter) -> JobEvent | None:
        """The event that fails the job, or None when the body names no job to fail."""
        error = JobError(
            stage=self.stage, code=outcome.code, message=outcome.reason, retryable=outcome.retryable
        )
        if ctx.msg is not None:
            return events.failed(self.stage, ctx.msg, error, ctx.attempt)
        if ctx.job_id and ctx.document_id:
            # The body is broken, but if it names its job, that job must still end `failed`.
            return JobEvent(
                job_id=ctx.job_id,
                document_id=ctx.document_id,
                stage=self.stage,
                kind="failed",
                attempt=ctx.attempt,
                error=error,
            )
        return None


def _in_lane(output: Message, given: Message) -> Message:
    """`output` in the lane of the message it was made from."""
    if output.priority == given.priority:
        return output
    return output.model_copy(update={"priority": given.priority})


def _headers(ctx: DeliveryContext) -> dict[str, Any]:
    """The delivery's own headers (trace context among them), carried on to where it goes."""
    return dict(ctx.delivery.headers or {})


def _moved_headers(ctx: DeliveryContext) -> dict[str, Any]:
    """The headers of a copy the stage consumes again (a retry, a parked one): its own, with
    its deaths carried over (stages/runtime/isolation.py)."""
    return moved_headers(ctx.delivery.headers, ctx.deliveries)
