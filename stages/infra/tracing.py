"""OpenTelemetry for every Sluice process: one trace per upload, across the broker.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and silently off otherwise. The aio-pika instrumentation
puts W3C trace context in the headers of every published message and opens a CONSUMER span
around every delivery, so each stage's work is a child of the publish that caused it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, Status, StatusCode

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
tracer = trace.get_tracer("sluice")


def enabled() -> bool:
    """Whether an OTLP endpoint is configured for this process."""
    return any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def setup_tracing(service: str) -> bool:
    """Export spans as `service` over OTLP/HTTP and instrument aio-pika; no-op when not enabled."""
    if not enabled():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    # Spans still queued when the process stops are sent, not dropped.
    atexit.register(provider.shutdown)
    AioPikaInstrumentor().instrument(tracer_provider=provider)
    return True


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def annotate(span: Span, attributes: Mapping[str, Any]) -> None:
    """Set Sluice attributes on a span, skipping empty values."""
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)


def record_failure(span: Span, exc: BaseException) -> None:
    """Mark a span failed with the exception that failed it."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


def link_to(headers: Mapping[str, Any] | None) -> list[Link]:
    """A link to the trace a message was first sent in (for replays, which start anew)."""
    context = trace.get_current_span(propagate.extract(dict(headers or {}))).get_span_context()
    return [Link(context)] if context.is_valid else []
