"""What a request may send: a body no larger than its limit, at a pace that does not stall.

One ASGI layer, `BodyLimits`, between the network and everything that reads a body
(Starlette's multipart parser spools uploads to disk as it reads them):

- A declared Content-Length over the limit is answered 413 before a byte is read.
- Whatever the transfer encoding (chunked has no length to check), the bytes the app is
  handed are counted, and past the limit it is handed no more: the layer answers 413 itself
  and the app sees the client gone. So no more than the limit is ever read, or spooled.
- A body that sends nothing for `body_timeout_s` while the app waits for it is answered 408
  `body_timeout` the same way.

Uploads (multipart) may be `max_upload_bytes` plus room for the envelope; any other body (the
JSON of a reindex or a replay) is small, and is parsed in memory, so it gets 1 MiB.
What is left unread of a body answered early is drained, for a bounded time, by the
connection (gateway/http/connections.py), so the client reads the answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.errors import error_response

# Room for the multipart envelope and form fields around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
OTHER_BODY_BYTES = 1024 * 1024
_DISCONNECT: Message = {"type": "http.disconnect"}


class BodyLimits:
    """Stop a request body at its size limit, and a stalled one after `body_timeout_s`."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an over-long declared body at once; else watch the body as it is read."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        too_large = self._too_large(headers)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > too_large.limit:
            await too_large.response(scope, receive, send)
            return
        body = _WatchedBody(scope, receive, send, too_large, self.body_timeout_s)
        await self.app(scope, body.receive, body.send)

    def _too_large(self, headers: Headers) -> _Limit:
        if headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return _Limit(
                self.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
                "file_too_large",
                f"The upload is larger than the {self.max_upload_bytes} byte limit "
                "(SLUICE_MAX_UPLOAD_BYTES).",
            )
        return _Limit(
            OTHER_BODY_BYTES,
            "body_too_large",
            f"The request body is larger than {OTHER_BODY_BYTES} bytes; only uploads "
            "(multipart/form-data) may be larger.",
        )


@dataclass(frozen=True)
class _Limit:
    """A body's size limit and what the answer past it says."""

    limit: int
    code: str
    message: str

    @property
    def response(self) -> Response:
        """The 413 answer."""
        return error_response(413, self.code, self.message)


class _WatchedBody:
    """One request's `receive` and `send`, counted and timed; once it has answered for the
    app, the app reads a disconnect and its own answer goes nowhere."""

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, limit: _Limit, timeout_s: float
    ) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._limit = limit
        self._timeout_s = timeout_s
        self._size = 0
        self._complete = False
        self._started = False
        self._answered = False

    async def receive(self) -> Message:
        """The next body message; a disconnect once this layer has answered."""
        if self._answered:
            return _DISCONNECT
        if self._complete:
            # After the body, receive waits for the client to leave (an event stream's way of
            # noticing): no deadline then.
            return await self._receive()
        try:
            async with asyncio.timeout(self._timeout_s):
                message = await self._receive()
        except TimeoutError:
            await self._answer(
                error_response(
                    408,
                    "body_timeout",
                    f"The request body sent nothing for {self._timeout_s:g} s "
                    "(SLUICE_BODY_TIMEOUT_S); send it again.",
                )
            )
            return _DISCONNECT
        if message["type"] == "http.request":
            self._size += len(message.get("body", b""))
            self._complete = not message.get("more_body", False)
            if self._size > self._limit.limit:
                await self._answer(self._limit.response)
                return _DISCONNECT
        return message

    async def send(self, message: Message) -> None:
        """The app's answer, unless this layer answered first."""
        if self._answered:
            return
        if message["type"] == "http.response.start":
            self._started = True
        await self._send(message)

    async def _answer(self, response: Response) -> None:
        self._answered = True
        # An app that already began its answer (none of ours reads a body after that) is
        # cut off instead: the server closes a response that never completes.
        if not self._started:
            await response(self._scope, self._receive, self._send)
