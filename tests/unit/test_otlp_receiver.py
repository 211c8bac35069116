"""The fake OTLP receiver, fed by the real OpenTelemetry SDK exporter over HTTP."""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Iterator
from unittest import mock

import httpx
import pytest
from fakes.otlp_receiver import FakeOtlpReceiver, ReceivedSpan
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode


@pytest.fixture
def receiver() -> Iterator[FakeOtlpReceiver]:
    """A running receiver, stopped after the test."""
    with FakeOtlpReceiver() as running:
        yield running


def provider(service: str, exporter: OTLPSpanExporter) -> TracerProvider:
    """A tracer provider of its own (not the global one) exporting each span as it ends."""
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": service}))
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider


def test_spans_from_the_sdk_exporter_arrive_whole(receiver: FakeOtlpReceiver) -> None:
    exporter = OTLPSpanExporter(
        endpoint=f"{receiver.endpoint}/v1/traces", compression=Compression.Gzip
    )
    gateway = provider("sluice-gateway", exporter)
    tracer = gateway.get_tracer("test")
    with (
        tracer.start_as_current_span("POST /v1/documents", kind=SpanKind.SERVER) as server,
        tracer.start_as_current_span(
            "sluice send",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "sluice.pages": 3,
                "sluice.ratio": 0.5,
                "sluice.retryable": False,
                "sluice.tags": ["a", "b"],
            },
            links=[Link(server.get_span_context())],
        ) as producer,
    ):
        producer.set_status(Status(StatusCode.ERROR, "unconfirmed"))
    gateway.shutdown()

    assert receiver.wait_for(lambda spans: len(spans) == 2, timeout_s=10), receiver.summary()
    by_name = {s.name: s for s in receiver.spans()}
    root, child = by_name["POST /v1/documents"], by_name["sluice send"]
    server_context = server.get_span_context()
    assert root == ReceivedSpan(
        service="sluice-gateway",
        name="POST /v1/documents",
        trace_id=format(server_context.trace_id, "032x"),
        span_id=format(server_context.span_id, "016x"),
        parent_span_id=None,
        kind="SERVER",
        attributes={},
        status_code="UNSET",
        links=[],
        scope="test",
        start_unix_nano=root.start_unix_nano,
        end_unix_nano=root.end_unix_nano,
    )
    assert 0 < root.start_unix_nano <= child.start_unix_nano <= child.end_unix_nano
    assert child.trace_id == root.trace_id
    assert child.parent_span_id == root.span_id
    assert child.kind == "PRODUCER"
    assert child.attributes == {
        "messaging.system": "rabbitmq",
        "sluice.pages": 3,
        "sluice.ratio": 0.5,
        "sluice.retryable": False,
        "sluice.tags": ["a", "b"],
    }
    assert (child.status_code, child.status_message) == ("ERROR", "unconfirmed")
    assert child.links == [(root.trace_id, root.span_id)]
    assert receiver.requests["/v1/traces"] == 2 and receiver.refused == []


def test_the_endpoint_works_as_the_sdk_base_url_and_traces_group_by_id(
    receiver: FakeOtlpReceiver,
) -> None:
    # Processes get the endpoint from the environment; the SDK appends /v1/traces itself.
    with mock.patch.dict(os.environ, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}):
        exporter = OTLPSpanExporter()
    parse = provider("sluice-parse", exporter)
    tracer = parse.get_tracer("test")
    with tracer.start_as_current_span("first", kind=SpanKind.CONSUMER):
        pass
    with (
        tracer.start_as_current_span("second", kind=SpanKind.CONSUMER),
        tracer.start_as_current_span("work"),
    ):
        pass
    parse.shutdown()

    assert receiver.wait_for(lambda spans: len(spans) == 3, timeout_s=10), receiver.summary()
    traces = receiver.traces()
    assert sorted(len(spans) for spans in traces.values()) == [1, 2]
    assert {s.service for s in receiver.spans()} == {"sluice-parse"}
    [second] = [s for s in receiver.spans() if s.name == "second"]
    assert receiver.render_tree(second.trace_id) == (
        "sluice-parse: second [CONSUMER]\n  sluice-parse: work [INTERNAL]"
    )


def test_a_tree_across_services_nests_children_under_parents(receiver: FakeOtlpReceiver) -> None:
    endpoint = f"{receiver.endpoint}/v1/traces"
    gateway = provider("sluice-gateway", OTLPSpanExporter(endpoint=endpoint))
    stage = provider("sluice-parse", OTLPSpanExporter(endpoint=endpoint))
    sender = gateway.get_tracer("t")
    with (
        sender.start_as_current_span("POST /v1/documents", kind=SpanKind.SERVER),
        sender.start_as_current_span("publish", kind=SpanKind.PRODUCER),
    ):
        # What crossing the broker does: the consumer continues the producer's context.
        carried = trace.get_current_span().get_span_context()
    upstream = trace.set_span_in_context(trace.NonRecordingSpan(carried))
    with stage.get_tracer("t").start_as_current_span(
        "parse", context=upstream, kind=SpanKind.CONSUMER
    ):
        pass
    gateway.shutdown()
    stage.shutdown()

    trace_id = format(carried.trace_id, "032x")
    assert receiver.wait_for(lambda spans: len(spans) == 3, timeout_s=10), receiver.summary()
    assert receiver.render_tree(trace_id) == (
        "sluice-gateway: POST /v1/documents [SERVER]\n"
        "  sluice-gateway: publish [PRODUCER]\n"
        "    sluice-parse: parse [CONSUMER]"
    )


def test_a_span_whose_parent_never_arrived_is_flagged(receiver: FakeOtlpReceiver) -> None:
    stage = provider("sluice-chunk", OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
    with stage.get_tracer("t").start_as_current_span("outer") as outer:
        # The parent ends (and is exported) only after this check.
        with stage.get_tracer("t").start_as_current_span("inner", kind=SpanKind.CONSUMER):
            pass
        assert receiver.wait_for(lambda spans: len(spans) == 1, timeout_s=10)
        trace_id = format(outer.get_span_context().trace_id, "032x")
        parent = format(outer.get_span_context().span_id, "016x")
        assert receiver.render_tree(trace_id) == (
            f"sluice-chunk: inner [CONSUMER] (parent {parent} not received)"
        )
    stage.shutdown()
    assert receiver.render_tree("0" * 32) == f"(no spans received for trace {'0' * 32})"


def test_wait_for_returns_false_at_its_deadline_and_wakes_on_arrival(
    receiver: FakeOtlpReceiver,
) -> None:
    assert receiver.wait_for(lambda spans: len(spans) > 0, timeout_s=0.2) is False
    stage = provider("sluice-embed", OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))

    def export_later() -> None:
        with stage.get_tracer("t").start_as_current_span("late"):
            pass

    sender = threading.Thread(target=export_later)
    sender.start()
    assert receiver.wait_for(lambda spans: any(s.name == "late" for s in spans), timeout_s=10)
    sender.join()
    stage.shutdown()


def test_metrics_and_logs_are_accepted_and_ignored_and_junk_refused(
    receiver: FakeOtlpReceiver,
) -> None:
    protobuf = {"content-type": "application/x-protobuf"}
    for path in ("/v1/metrics", "/v1/logs"):
        answer = httpx.post(f"{receiver.endpoint}{path}", content=b"\x0a\x00", headers=protobuf)
        assert answer.status_code == 200, path
    junk = httpx.post(f"{receiver.endpoint}/v1/traces", content=b"\xff\xff", headers=protobuf)
    assert junk.status_code == 400
    zipped_junk = httpx.post(
        f"{receiver.endpoint}/v1/traces",
        content=gzip.compress(b"\xff\xff"),
        headers={**protobuf, "content-encoding": "gzip"},
    )
    assert zipped_junk.status_code == 400
    assert httpx.post(f"{receiver.endpoint}/v2/other", content=b"").status_code == 404
    assert receiver.spans() == [] and len(receiver.refused) == 3
