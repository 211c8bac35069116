"""The stage runtime: consume, validate, call the handler, publish with confirms, then ack.

How a delivery ends is decided here, once, for every stage:
- handler returned → outputs and the progress event published, both confirmed → ack (a
  handler that takes longer than `ANNOUNCE_AFTER_S` also announces a `started` event);
- `Permanent` (or a message that does not validate) → copy to the dead-letter exchange with
  the reason in headers → `failed` event → ack;
- `Transient` → a few short in-process retries first (jittered, never long enough to hold a
  message near the consumer timeout);
- anything still failing → republished to the stage's retry tier for its attempt (a TTL queue
  that dead-letters back), ack; after `max_attempts` it is dead-lettered as retryable.
A worker that dies mid-message never acks it: RabbitMQ redelivers it with `x-delivery-count`.
One that has been delivered `delivery_limit` times already is set aside as `worker_crashed`
before it can kill another worker; the quorum queue's own delivery limit is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from contracts import events, routing
from contracts.errors import Permanent, SluiceError, Transient
from contracts.events import JobError
from contracts.messages import Message
from contracts.settings import Settings
from contracts.topology import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    JOB_HEADER,
    STAGE_HEADER,
)
from stages.infra import metrics, tracing
from stages.infra.broker import Broker, PublishRejected, declare_queue, header_int
from stages.infra.dead_letters import now_header
from stages.infra.logs import bind, log_context
from stages.stage import Stage

log = logging.getLogger(__name__)
# Set by quorum queues on redelivery: how often the message was handed out and not settled.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# A handler still busy after this long announces that its stage started on the job.
ANNOUNCE_AFTER_S = 0.5


class StageRunner:
    """Runs one stage's consumer until asked to stop, then drains in-flight work."""

    def __init__(self, stage: Stage[Any, Any], ctx: Any, settings: Settings, broker: Broker):
        self.stage = stage
        self.ctx = ctx
        self.settings = settings
        self.broker = broker
        self.queue_name = routing.stage_queue(settings.namespace, stage.name)
        self._slots = asyncio.Semaphore(settings.tuning(stage.name).concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._announcing: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, *, drain_timeout_s: float = 30.0) -> None:
        """Consume until `stop` is set; then stop taking messages and finish those in hand."""
        channel = await self.broker.consumer_channel(self.settings.tuning(self.stage.name).prefetch)
        # Declared (not just looked up) on the robust channel: if the broker cancels the
        # consumer because the queue went away, recovery declares it again and re-consumes.
        queue = await declare_queue(channel, self.broker.topology, self.queue_name)
        tag = await queue.consume(self._on_message)
        log.info("stage %s consuming %s", self.stage.name, self.queue_name)
        await stop.wait()
        await queue.cancel(tag)
        if self._in_flight:
            log.info(
                "stage %s finishing %d in-flight messages", self.stage.name, len(self._in_flight)
            )
            _, pending = await asyncio.wait(self._in_flight, timeout=drain_timeout_s)
            # Unfinished work is not acked: closing the channel hands it back to the queue.
            for task in pending:
                task.cancel()
        await channel.close()

    async def _on_message(self, delivery: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        metrics.CONSUMED.labels(self.stage.name).inc()
        span = trace.get_current_span()
        span.update_name(f"{self.queue_name} process")
        tracing.annotate(
            span,
            {
                "messaging.system": "rabbitmq",
                "messaging.destination.name": self.queue_name,
                "messaging.rabbitmq.destination.routing_key": delivery.routing_key,
                "messaging.message.id": delivery.message_id,
            },
        )
        try:
            async with self._slots:
                with log_context(stage=self.stage.name):
                    await self.process(delivery)
        except Exception:
            # Nothing could be published (the broker went away mid-message): leave the message
            # unacked so RabbitMQ delivers it again; redelivered work is idempotent.
            log.exception("%s: could not finish a message; it will be redelivered", self.stage.name)
            with contextlib.suppress(Exception):
                await delivery.nack(requeue=True)
        finally:
            self._in_flight.discard(task)

    async def process(self, delivery: AbstractIncomingMessage) -> None:
        """Handle one delivery to its end: ack after success, retry, or dead-letter."""
        attempt = header_int(delivery.headers, ATTEMPT_HEADER, 1)
        try:
            msg = self.stage.input.model_validate_json(delivery.body)
        except ValidationError as exc:
            error = Permanent(
                f"{self.stage.name}: the message is not a valid {self.stage.input.__name__}: "
                f"{_first_error(exc)}",
                code="invalid_message",
            )
            await self._dead_letter(delivery, None, error, attempt, retryable=False)
            return
        deliveries = header_int(delivery.headers, DELIVERY_COUNT_HEADER, 0)
        if deliveries >= self.settings.delivery_limit:
            crashed = Permanent(
                f"{self.stage.name}: {msg.filename} was in hand {deliveries} times when its "
                "worker died; it is set aside so the stage keeps serving other documents. "
                "Find the cause in the stage's log, then replay it (sluice dlq replay).",
                code="worker_crashed",
            )
            await self._dead_letter(delivery, msg, crashed, attempt, retryable=False)
            return
        bind(job_id=msg.job_id, document_id=msg.document_id)
        span = trace.get_current_span()
        index, count, chunks = msg.unit()
        tracing.annotate(
            span,
            {
                "sluice.job_id": msg.job_id,
                "sluice.document_id": msg.document_id,
                "sluice.collection": msg.collection,
                "sluice.attempt": attempt,
                "sluice.batch_index": index,
                "sluice.batch_count": count,
                "sluice.batch_size": chunks or None,
            },
        )
        announcing = None
        if index == 0:
            # Only work a person could watch gets its own `started` event: a handler done
            # sooner says so with its progress event alone, one broker message fewer.
            announcing = asyncio.get_running_loop().call_later(
                ANNOUNCE_AFTER_S, self._announce, events.started(self.stage.name, msg, attempt)
            )
        started = time.perf_counter()
        try:
            outputs = await self._handle(msg)
        except Permanent as exc:
            await self._dead_letter(delivery, msg, exc, attempt, retryable=False)
            return
        except Exception as exc:
            await self._retry_or_give_up(delivery, msg, exc, attempt)
            return
        finally:
            if announcing is not None:
                announcing.cancel()
        event = events.progress(self.stage.name, msg, outputs, attempt)
        try:
            # Confirmed together, in one round trip; the ack waits for both. A progress event
            # confirmed beside outputs the broker refused only runs ahead of the retry that
            # publishes them again (units count once).
            await asyncio.gather(
                *(self.broker.publish(out) for out in outputs), self.broker.publish(event)
            )
        except PublishRejected:
            # The next stage's queue is full: that is backpressure, not a failure of this
            # message, so it waits in the first retry tier without spending an attempt.
            metrics.RETRIED.labels(self.stage.name, "pipeline_saturated").inc()
            await self._retry_later(delivery, attempt, self.settings.retry_delays_s[0])
            return
        await delivery.ack()
        elapsed_s = time.perf_counter() - started
        log.info(
            "%s: %s batch %d/%d done in %.2fs",
            self.stage.name,
            msg.filename,
            index + 1,
            count,
            elapsed_s,
        )
        metrics.HANDLER_SECONDS.labels(self.stage.name).observe(elapsed_s)
        metrics.SUCCEEDED.labels(self.stage.name).inc()
        metrics.CHUNKS.labels(self.stage.name).inc(chunks)
        tracing.annotate(span, {"sluice.pages": event.pages, "sluice.chunks": event.chunks_total})

    def _announce(self, event: events.JobEvent) -> None:
        """Publish a `started` event without waiting for it: a lost one loses nothing (progress
        moves the job on too), so the handler does not wait a round trip for its confirm."""
        task = asyncio.create_task(self.broker.publish(event))
        self._announcing.add(task)
        task.add_done_callback(self._announced)

    def _announced(self, task: asyncio.Task[None]) -> None:
        self._announcing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s: a started event was not published: %s", self.stage.name, exc)

    async def _handle(self, msg: Message) -> Sequence[Message]:
        """The stage's handler, with short jittered retries of transient errors in-process."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.settings.transient_retries + 1),
            wait=wait_random_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )
        outputs: Sequence[Message] = []
        async for attempt in retrying:
            with attempt:
                outputs = await self.stage.handle(msg, self.ctx)
        return outputs

    async def _retry_or_give_up(
        self, delivery: AbstractIncomingMessage, msg: Message, exc: Exception, attempt: int
    ) -> None:
        if attempt >= self.settings.max_attempts:
            await self._dead_letter(delivery, msg, exc, attempt, retryable=True)
            return
        delays = self.settings.retry_delays_s
        delay_s = delays[min(attempt - 1, len(delays) - 1)]
        log.warning(
            "%s: job %s attempt %d failed (%s); retrying in %ds",
            self.stage.name,
            msg.job_id,
            attempt,
            exc,
            delay_s,
        )
        code = exc.code if isinstance(exc, SluiceError) else "internal_error"
        metrics.RETRIED.labels(self.stage.name, code).inc()
        tracing.record_failure(trace.get_current_span(), exc)
        await self._retry_later(delivery, attempt + 1, delay_s)

    async def _retry_later(
        self, delivery: AbstractIncomingMessage, attempt: int, delay_s: int
    ) -> None:
        """Park the message in a retry tier (a TTL queue that hands it back), then ack it."""
        await self.broker.publish_raw(
            "",
            routing.retry_queue(self.settings.namespace, self.stage.name, delay_s),
            delivery.body,
            headers={**(delivery.headers or {}), ATTEMPT_HEADER: attempt},
            message_id=delivery.message_id,
        )
        await delivery.ack()

    async def _dead_letter(
        self,
        delivery: AbstractIncomingMessage,
        msg: Message | None,
        exc: Exception,
        attempt: int,
        *,
        retryable: bool,
    ) -> None:
        code = exc.code if isinstance(exc, SluiceError) else "internal_error"
        reason = str(exc) or type(exc).__name__
        metrics.DEAD_LETTERED.labels(self.stage.name, code).inc()
        tracing.record_failure(trace.get_current_span(), exc)
        job_id = msg.job_id if msg else _peek(delivery.body, "job_id")
        log.error("%s: job %s failed permanently (%s): %s", self.stage.name, job_id, code, reason)
        await self.broker.publish_raw(
            routing.dead_letter_exchange(self.settings.namespace),
            delivery.routing_key or self.stage.input.routing_key,
            delivery.body,
            headers={
                **(delivery.headers or {}),
                STAGE_HEADER: self.stage.name,
                ERROR_CODE_HEADER: code,
                ERROR_HEADER: reason[:1000],
                ATTEMPT_HEADER: attempt,
                JOB_HEADER: job_id or "",
                **now_header(),
            },
            message_id=delivery.message_id,
        )
        error = JobError(stage=self.stage.name, code=code, message=reason, retryable=retryable)
        if msg is not None:
            await self.broker.publish(events.failed(self.stage.name, msg, error, attempt))
        elif job_id and (document_id := _peek(delivery.body, "document_id")):
            # The body is broken, but if it names its job, that job must still end `failed`.
            await self.broker.publish(
                events.JobEvent(
                    job_id=job_id,
                    document_id=document_id,
                    stage=self.stage.name,
                    kind="failed",
                    attempt=attempt,
                    error=error,
                )
            )
        await delivery.ack()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def _peek(body: bytes, field: str) -> str | None:
    """A string field of a JSON body that failed validation, if it has one."""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
