"""TEST DOUBLE: an OTLP/HTTP receiver on 127.0.0.1 that collects the spans processes export,
so tests can assert on real traces without Jaeger or a collector.

It speaks what the OpenTelemetry SDK's `OTLPSpanExporter` sends: `POST /v1/traces` with an
`ExportTraceServiceRequest` in protobuf (optionally gzip or deflate compressed), answered with an
empty `ExportTraceServiceResponse`. `/v1/metrics` and `/v1/logs` are accepted and ignored.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any

# protobuf ships no type stubs (types-protobuf is not a dependency).
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

from fakes.loopback import LoopbackServer

_KINDS = {
    ProtoSpan.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    ProtoSpan.SPAN_KIND_INTERNAL: "INTERNAL",
    ProtoSpan.SPAN_KIND_SERVER: "SERVER",
    ProtoSpan.SPAN_KIND_CLIENT: "CLIENT",
    ProtoSpan.SPAN_KIND_PRODUCER: "PRODUCER",
    ProtoSpan.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUS_CODES = {
    ProtoStatus.STATUS_CODE_UNSET: "UNSET",
    ProtoStatus.STATUS_CODE_OK: "OK",
    ProtoStatus.STATUS_CODE_ERROR: "ERROR",
}
_IGNORED_PATHS = ("/v1/metrics", "/v1/logs")


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, with ids as lowercase hex."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: str
    attributes: dict[str, Any]
    status_code: str
    links: list[tuple[str, str]] = field(default_factory=list)
    status_message: str = ""
    scope: str = ""
    start_unix_nano: int = 0
    end_unix_nano: int = 0

    def __str__(self) -> str:
        return f"{self.service}: {self.name} [{self.kind}]"


class FakeOtlpReceiver:
    """TEST DOUBLE for an OTLP/HTTP collector; give `endpoint` as `OTEL_EXPORTER_OTLP_ENDPOINT`."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._server: LoopbackServer | None = None
        # Requests by path, and the reasons of the ones refused (a test can show them).
        self.requests: dict[str, int] = defaultdict(int)
        self.refused: list[str] = []

    @property
    def endpoint(self) -> str:
        """The base URL (`http://127.0.0.1:PORT`); exporters append `/v1/traces`."""
        if self._server is None:
            raise RuntimeError("the fake OTLP receiver is not running: call start() first")
        return f"{self._server.base_url}"

    def start(self) -> FakeOtlpReceiver:
        """Serve on a free loopback port in a background thread."""
        self._server = LoopbackServer(_handler_for(self), "fake-otlp-receiver")
        return self

    def stop(self) -> None:
        """Stop serving and free the port (collected spans stay readable)."""
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> FakeOtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._changed:
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans received so far, grouped by trace id."""
        grouped: dict[str, list[ReceivedSpan]] = defaultdict(list)
        for span in self.spans():
            grouped[span.trace_id].append(span)
        return dict(grouped)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0
    ) -> bool:
        """Block until `predicate(spans so far)` holds (True) or `timeout_s` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._spans)), timeout=timeout_s)

    def clear(self) -> None:
        """Forget every span received so far."""
        with self._changed:
            self._spans.clear()

    def summary(self) -> str:
        """Span counts by service and kind: what arrived, for a failing test's message."""
        counts: dict[str, int] = defaultdict(int)
        for span in self.spans():
            counts[f"{span.service} {span.kind}"] += 1
        listed = ", ".join(f"{key}: {n}" for key, n in sorted(counts.items()))
        received = f"{sum(counts.values())} spans received ({listed or 'none'})"
        return f"{received}; requests by path {dict(self.requests)}; refused {self.refused}"

    def render_tree(self, trace_id: str) -> str:
        """The trace as an indented tree, one `service: name [KIND]` line per span.

        Children are listed under their parent in start order. A span whose parent never arrived
        is shown at the top level with `(parent … not received)`.
        """
        spans = sorted(self.traces().get(trace_id, []), key=lambda s: s.start_unix_nano)
        if not spans:
            return f"(no spans received for trace {trace_id})"
        ids = {s.span_id for s in spans}
        children: dict[str | None, list[ReceivedSpan]] = defaultdict(list)
        for span in spans:
            parent = span.parent_span_id if span.parent_span_id in ids else None
            children[parent].append(span)
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> None:
            note = ""
            if span.parent_span_id is not None and span.parent_span_id not in ids:
                note = f" (parent {span.parent_span_id} not received)"
            lines.append(f"{'  ' * depth}{span}{note}")
            for child in children.get(span.span_id, []):
                walk(child, depth + 1)

        for root in children[None]:
            walk(root, 0)
        return "\n".join(lines)

    def receive(self, path: str, body: bytes, content_encoding: str | None) -> tuple[int, bytes]:
        """Take one request; returns the status and body to answer with."""
        with self._changed:
            self.requests[path] += 1
        try:
            raw = _decompress(body, content_encoding)
        except (OSError, zlib.error, ValueError) as exc:
            return self._refuse(f"{path}: cannot decompress ({content_encoding}): {exc}")
        if path in _IGNORED_PATHS:
            return 200, b""
        if path != "/v1/traces":
            return self._refuse(f"no route {path}", status=404)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(raw)
        except DecodeError as exc:
            return self._refuse(f"{path}: not an ExportTraceServiceRequest: {exc}")
        received = list(_spans_of(request))
        with self._changed:
            self._spans.extend(received)
            self._changed.notify_all()
        return 200, ExportTraceServiceResponse().SerializeToString()

    def _refuse(self, reason: str, status: int = 400) -> tuple[int, bytes]:
        with self._changed:
            self.refused.append(reason)
        return status, reason.encode()


def _decompress(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "identity":
        return body
    raise ValueError(f"unsupported content encoding {encoding!r}")


def _spans_of(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", "unknown_service"))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        kind=_KINDS.get(span.kind, str(span.kind)),
                        attributes=_attributes(span.attributes),
                        status_code=_STATUS_CODES.get(span.status.code, str(span.status.code)),
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        status_message=span.status.message,
                        scope=scope_spans.scope.name,
                        start_unix_nano=span.start_time_unix_nano,
                        end_unix_nano=span.end_time_unix_nano,
                    )
                )
    return spans


def _attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        result[pair.key] = _value(pair.value)
    return result


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _handler_for(receiver: FakeOtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self._read_body()
            status, answer = receiver.receive(
                self.path.split("?", 1)[0].rstrip("/"),
                body,
                self.headers.get("content-encoding"),
            )
            self.send_response(status)
            self.send_header(
                "content-type", "application/x-protobuf" if status == 200 else "text/plain"
            )
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                # The blank line (or trailers) after the last chunk.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("content-length", "0")))

        def log_message(self, format: str, *args: Any) -> None:
            pass  # Tests read spans, not access logs.

    return Handler
