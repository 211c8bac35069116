"""TEST DOUBLE: an OpenAI-compatible embeddings endpoint on 127.0.0.1, computing real vectors
with the packaged model, that can be told to fail, reject, reorder or mangle its answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any

from fakes.loopback import LoopbackServer
from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.protocols import Embedder

# One answer's `data` list, for `tamper` hooks that break it on purpose.
Data = list[dict[str, Any]]


@dataclass(frozen=True)
class ReceivedRequest:
    """What one request to the fake carried."""

    model: str
    inputs: list[str]
    authorization: str | None


class FakeEmbeddingsServer:
    """TEST DOUBLE for an embeddings endpoint; `url` is the base (`.../v1`), as for OpenAI."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self._embedder = embedder
        self._lock = threading.Lock()
        # The model is not safe to call from several handler threads at once.
        self._model_lock = threading.Lock()
        self._server: LoopbackServer | None = None
        self._fail_next = 0
        self._fail_status = 503
        self.reject_marker: str | None = None
        self.out_of_order = False
        self.scale = 1.0
        self.tamper: Callable[[Data], Data] | None = None
        # When set, each request waits for this event before answering (to test timeouts).
        self.hold: threading.Event | None = None
        self.served = 0
        self.failed = 0
        self.rejected = 0
        self.received: list[ReceivedRequest] = []

    @property
    def url(self) -> str:
        """The base URL to give as `SLUICE_EMBED_URL`."""
        if self._server is None:
            raise RuntimeError("the fake embeddings server is not running: call start() first")
        return f"{self._server.base_url}/v1"

    def start(self) -> FakeEmbeddingsServer:
        """Load the model (unless given one) and serve on a free loopback port."""
        if self._embedder is None:
            self._embedder = SentenceTransformerEmbedder(None, "cpu", 64)
        self._server = LoopbackServer(_handler_for(self), "fake-embeddings")
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> FakeEmbeddingsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` instead of embeddings."""
        with self._lock:
            self._fail_next = count
            self._fail_status = status

    def reset(self) -> None:
        """Back to answering every request correctly, with counters at zero."""
        with self._lock:
            self._fail_next = 0
            self.reject_marker = None
            self.out_of_order = False
            self.scale = 1.0
            self.tamper = None
            self.hold = None
            self.served = self.failed = self.rejected = 0
            self.received.clear()

    def answer(self, body: dict[str, Any], authorization: str | None) -> tuple[int, Any]:
        """The status and JSON body for one request (what the HTTP handler sends)."""
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            return 400, _error("'input' must be a string or a list of strings")
        with self._lock:
            self.received.append(ReceivedRequest(str(body.get("model")), inputs, authorization))
            if self._fail_next > 0:
                self._fail_next -= 1
                self.failed += 1
                return self._fail_status, _error("the fake was told to fail this request")
            marker, hold = self.reject_marker, self.hold
            if marker is not None and any(marker in t for t in inputs):
                self.rejected += 1
                return 400, _error(f"an input contains the rejected marker {marker!r}")
        if hold is not None:
            hold.wait(timeout=60)
        assert self._embedder is not None
        with self._model_lock:
            vectors = self._embedder.embed(inputs)
        data: Data = [
            {"object": "embedding", "index": i, "embedding": [float(x) * self.scale for x in v]}
            for i, v in enumerate(vectors)
        ]
        if self.out_of_order:
            data.reverse()
        if self.tamper is not None:
            data = self.tamper(data)
        with self._lock:
            self.served += 1
        return 200, {"object": "list", "data": data, "model": body.get("model")}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def _handler_for(fake: FakeEmbeddingsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/embeddings":
                self._send(404, _error(f"no route {self.path}"))
                return
            length = int(self.headers.get("content-length", "0"))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                body = None
            if not isinstance(body, dict):
                self._send(400, _error("the body is not a JSON object"))
                return
            self._send(*fake.answer(body, self.headers.get("authorization")))

        def _send(self, status: int, payload: Any) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # Tests read counters, not access logs.

    return Handler
