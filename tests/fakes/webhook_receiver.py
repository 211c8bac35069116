"""TEST DOUBLE: a webhook receiver on 127.0.0.1 that records every POST, checks its signature
with the same definition receivers are told to use (contracts/webhook_signature.py), and
answers what a test scripted per path (e.g. 500, 500, then 200)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any

from contracts.webhook_signature import DELIVERY_HEADER, JOB_HEADER, SIGNATURE_HEADER, verify
from fakes.loopback import LoopbackServer


@dataclass(frozen=True)
class ReceivedWebhook:
    """One POST as the receiver saw it, and what it answered."""

    path: str
    body: bytes
    headers: dict[str, str]
    # Whether `X-Sluice-Signature` is the HMAC of the body under the receiver's secret.
    signature_ok: bool
    answered: int

    @property
    def job(self) -> dict[str, Any]:
        """The job JSON it carried."""
        job: dict[str, Any] = json.loads(self.body)
        return job

    @property
    def delivery_id(self) -> str | None:
        """Its `X-Sluice-Delivery` header."""
        return self.headers.get(DELIVERY_HEADER.lower())

    @property
    def job_id(self) -> str | None:
        """Its `X-Sluice-Job-Id` header."""
        return self.headers.get(JOB_HEADER.lower())


class FakeWebhookReceiver:
    """TEST DOUBLE for a webhook receiver; `url(path)` is a callback URL on it."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._changed = threading.Condition()
        self._scripts: dict[str, list[int]] = {}
        self._server: LoopbackServer | None = None
        self.received: list[ReceivedWebhook] = []

    def start(self) -> FakeWebhookReceiver:
        """Serve on a free loopback port."""
        self._server = LoopbackServer(_handler_for(self), "fake-webhook-receiver")
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> FakeWebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, path: str) -> str:
        """The callback URL of `path` on this receiver (`/hooks/NAME`)."""
        if self._server is None:
            raise RuntimeError("the fake webhook receiver is not running: call start() first")
        return f"{self._server.base_url}{path}"

    def script(self, path: str, statuses: Iterable[int]) -> None:
        """Answer the next POSTs to `path` with these statuses in turn, then 200."""
        with self._changed:
            self._scripts[path] = list(statuses)

    def at(self, path: str) -> list[ReceivedWebhook]:
        """Every POST to `path` so far, in the order they came."""
        with self._changed:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, count: int, deadline_s: float = 120.0) -> list[ReceivedWebhook]:
        """Block until `path` has had `count` POSTs (or the deadline: AssertionError)."""
        deadline = time.monotonic() + deadline_s
        with self._changed:
            while True:
                got = [r for r in self.received if r.path == path]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{path} had {len(got)} webhook(s) of {count} in {deadline_s}s: {got}"
                    )
                self._changed.wait(left)

    def take(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        """Record one POST and choose its answer (what the HTTP handler sends)."""
        with self._changed:
            script = self._scripts.get(path, [])
            status = script.pop(0) if script else 200
            self.received.append(
                ReceivedWebhook(
                    path=path,
                    body=body,
                    headers=headers,
                    signature_ok=verify(self.secret, body, headers.get(SIGNATURE_HEADER.lower())),
                    answered=status,
                )
            )
            self._changed.notify_all()
        return status


def _handler_for(fake: FakeWebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = fake.take(self.path, body, headers)
            raw = json.dumps({"received": status < 300}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # Tests read what was received, not access logs.

    return Handler
