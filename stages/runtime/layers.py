"""Concerns wrapped around the handling of every delivery, one layer each (Dramatiq's middleware).

A layer gets the delivery in hand and the handling inside it, and returns the outcome that
handling settled; it may act before and after, never settle by itself (the crash guard asks
`settle`). Adding a concern is adding a layer to the list the runner is given, not an edit
inside the runner. The runner's default order, outermost first: crash guard, log context,
tracing, metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from opentelemetry import trace

from stages.infra import stage_metrics as metrics
from stages.infra import tracing
from stages.infra.logs import log_context
from stages.runtime.outcome import DeadLetter, Done, Outcome, Park, Requeue, Retry
from stages.runtime.reading import DeliveryContext

log = logging.getLogger(__name__)

Handling = Callable[[DeliveryContext], Awaitable[Outcome]]
Settle = Callable[[DeliveryContext, Outcome], Awaitable[Outcome]]


class Layer(Protocol):
    """One concern around the handling of each delivery."""

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        """Do this concern's part around `inner`, which decides and settles the delivery."""
        ...


def wrap(layers: Sequence[Layer], core: Handling) -> Handling:
    """`core` inside `layers`, the first one outermost."""
    handling = core
    for layer in reversed(layers):
        handling = _around(layer, handling)
    return handling


def _around(layer: Layer, inner: Handling) -> Handling:
    async def handling(ctx: DeliveryContext) -> Outcome:
        return await layer(ctx, inner)

    return handling


class CrashGuard:
    """Whatever escapes the layers inside leaves the delivery unacked, to be redelivered."""

    def __init__(self, settle: Settle) -> None:
        self.settle = settle

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        """Run `inner`; on an unexpected error, settle the delivery as `Requeue`."""
        try:
            return await inner(ctx)
        except Exception as exc:
            if ctx.settled is not None:
                # It failed after the broker was told: nothing is left to hand back.
                log.exception("%s: job %s: a layer failed after settling", ctx.stage, ctx.job_id)
                return ctx.settled
            log.exception(
                "%s: job %s: the runtime failed on a message; it will be redelivered",
                ctx.stage,
                ctx.job_id,
            )
            return await self.settle(ctx, Requeue(exc))


class LogContext:
    """Stage, job and document on every log record of the delivery; one line on how it ended."""

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        """Bind the context around `inner`, then log its outcome."""
        with log_context(stage=ctx.stage, job_id=ctx.job_id, document_id=ctx.document_id):
            outcome = await inner(ctx)
            _log_outcome(ctx, outcome)
            return outcome


def _log_outcome(ctx: DeliveryContext, outcome: Outcome) -> None:
    if isinstance(outcome, Done) and ctx.msg is not None:
        index, count, _ = ctx.msg.unit()
        # At debug: a busy stage finishes hundreds a second; the heartbeat's summary line
        # says how many at INFO (stages/runtime/heartbeat.py).
        log.debug(
            "%s: %s batch %d/%d done in %.2fs",
            ctx.stage,
            ctx.msg.filename,
            index + 1,
            count,
            ctx.elapsed_s(),
        )
    elif isinstance(outcome, Retry) and outcome.spend_attempt:
        log.warning(
            "%s: job %s attempt %d failed (%s); retrying in %ds",
            ctx.stage,
            ctx.job_id,
            outcome.attempt,
            outcome.error,
            outcome.delay_s,
        )
    elif isinstance(outcome, Retry) and not outcome.backpressure:
        log.warning(
            "%s: job %s waits %ds for space (%s)",
            ctx.stage,
            ctx.job_id,
            outcome.delay_s,
            outcome.error,
        )
    elif isinstance(outcome, Retry):
        log.info(
            "%s: job %s waits %ds, the next stage is full (%s)",
            ctx.stage,
            ctx.job_id,
            outcome.delay_s,
            outcome.error,
        )
    elif isinstance(outcome, DeadLetter):
        log.error(
            "%s: job %s failed permanently (%s): %s",
            ctx.stage,
            ctx.job_id,
            outcome.code,
            outcome.reason,
        )
    elif isinstance(outcome, Park):
        log.debug("%s: job %s waits: a redelivered message runs alone", ctx.stage, ctx.job_id)
    elif isinstance(outcome, Requeue):
        log.error(
            "%s: could not finish a message; it will be redelivered",
            ctx.stage,
            exc_info=outcome.error,
        )


class Tracing:
    """The delivery's CONSUMER span (opened by the aio-pika instrumentation) named and annotated."""

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        """Annotate the current span before `inner`, and mark it failed unless it ended Done."""
        span = trace.get_current_span()
        span.update_name(f"{ctx.queue} process")
        tracing.annotate(
            span,
            {
                "messaging.system": "rabbitmq",
                "messaging.destination.name": ctx.queue,
                "messaging.rabbitmq.destination.routing_key": ctx.delivery.routing_key,
                "messaging.message.id": ctx.delivery.message_id,
            },
        )
        if ctx.msg is not None:
            index, count, chunks = ctx.msg.unit()
            tracing.annotate(
                span,
                {
                    "sluice.job_id": ctx.msg.job_id,
                    "sluice.document_id": ctx.msg.document_id,
                    "sluice.collection": ctx.msg.collection,
                    "sluice.attempt": ctx.attempt,
                    "sluice.batch_index": index,
                    "sluice.batch_count": count,
                    "sluice.batch_size": chunks or None,
                },
            )
        outcome = await inner(ctx)
        if isinstance(outcome, Done):
            tracing.annotate(
                span,
                {"sluice.pages": outcome.event.pages, "sluice.chunks": outcome.event.chunks_total},
            )
        elif isinstance(outcome, Park):
            # Set aside unrun while a redelivered message runs alone: no failure of its own.
            tracing.annotate(span, {"sluice.parked": True})
        elif not (isinstance(outcome, Retry) and outcome.backpressure):
            # Backpressure is no failure of this message; everything else failed its span.
            tracing.record_failure(span, outcome.error)
        return outcome


class Metrics:
    """The stage's Prometheus counters: consumed, then how each delivery ended."""

    async def __call__(self, ctx: DeliveryContext, inner: Handling) -> Outcome:
        """Count the delivery, run `inner`, count its outcome."""
        metrics.CONSUMED.labels(ctx.stage).inc()
        outcome = await inner(ctx)
        if isinstance(outcome, Done):
            metrics.HANDLER_SECONDS.labels(ctx.stage).observe(ctx.elapsed_s())
            metrics.SUCCEEDED.labels(ctx.stage).inc()
            metrics.CHUNKS.labels(ctx.stage).inc(ctx.msg.unit()[2] if ctx.msg else 0)
        elif isinstance(outcome, Retry):
            metrics.RETRIED.labels(ctx.stage, outcome.code).inc()
        elif isinstance(outcome, DeadLetter):
            metrics.DEAD_LETTERED.labels(ctx.stage, outcome.code).inc()
        return outcome
