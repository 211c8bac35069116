"""The body layer (gateway/http/body_limits.py) driven message by message: how much of a body
it lets an app read, when it answers for the app, and when it leaves `receive` alone."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gateway.http.body_limits import MULTIPART_OVERHEAD_BYTES, BodyLimits

CHUNK = 64 * 1024
LIMIT = 4 * CHUNK


def _scope(content_type: str = "multipart/form-data; boundary=b") -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/documents",
        "headers": [(b"content-type", content_type.encode())],
    }


class ReadsEverything:
    """An app that reads the body to its end (as a multipart parser does), then answers."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.last: Message = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            self.last = await receive()
            if self.last["type"] == "http.disconnect":
                break
            self.bytes_read += len(self.last.get("body", b""))
            if not self.last.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"the app's own answer"})


def _answer(sent: list[Message]) -> tuple[int, dict[str, Any]]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    return sent[0]["status"], json.loads(sent[1]["body"])["error"]


async def test_a_body_past_its_limit_is_read_no_further() -> None:
    calls = 0

    async def endless() -> Message:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = ReadsEverything()
    await BodyLimits(app, max_upload_bytes=LIMIT, body_timeout_s=60)(_scope(), endless, send)

    allowed = LIMIT + MULTIPART_OVERHEAD_BYTES
    # The chunk that crossed the limit was the last one taken, and the app never saw it.
    assert calls == allowed // CHUNK + 1
    assert app.bytes_read <= allowed
    assert app.last == {"type": "http.disconnect"}
    status, error = _answer(sent)
    assert (status, error["code"]) == (413, "file_too_large")


async def test_a_non_upload_body_has_the_small_limit() -> None:
    async def big() -> Message:
        return {"type": "http.request", "body": b"x" * (2 * 1024 * 1024), "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = ReadsEverything()
    await BodyLimits(app, max_upload_bytes=LIMIT * 100, body_timeout_s=60)(
        _scope("application/json"), big, send
    )
    assert app.bytes_read == 0
    status, error = _answer(sent)
    assert (status, error["code"]) == (413, "body_too_large")


async def test_a_stalled_body_is_answered_408_for_the_app() -> None:
    given = False
    never = asyncio.Event()

    async def stalls() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}
        await never.wait()
        raise AssertionError("unreachable")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    app = ReadsEverything()
    await BodyLimits(app, max_upload_bytes=LIMIT, body_timeout_s=0.05)(_scope(), stalls, send)

    assert app.bytes_read == 10
    assert app.last == {"type": "http.disconnect"}
    status, error = _answer(sent)
    assert (status, error["code"]) == (408, "body_timeout")


async def test_after_the_body_receive_waits_for_the_client_without_a_deadline() -> None:
    # An event stream calls receive after the body to learn when the client leaves.
    left = asyncio.Event()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def client() -> Message:
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect", "client": "left"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    got: list[Message] = []

    async def streams(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        got.append(await receive())

    layer = BodyLimits(streams, max_upload_bytes=LIMIT, body_timeout_s=0.01)
    running = asyncio.create_task(layer(_scope("text/plain"), client, send))
    # Well past the body deadline, the stream still waits for its client.
    await asyncio.sleep(0.3)
    assert not running.done()
    left.set()
    await running

    assert got[-1] == {"type": "http.disconnect", "client": "left"}
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]
