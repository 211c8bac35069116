"""The gateway as `sluice gateway` serves it (uvicorn with gateway/http/connections.py) on a
loopback port, against clients that are slow, silent, too many, or send too much, over raw
sockets: what only a real server shows. No broker: the gateway serves without one."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.connections import server_options

# Deadlines for a slow machine; the tests wait on state, these only bound the wait.
DEADLINE_S = 60.0
MIB = 1024 * 1024
MULTIPART = "multipart/form-data; boundary=sluice-test"
# The start of a multipart body whose one file goes on for as long as the client sends.
PART_HEAD = (
    b"--sluice-test\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass
class Running:
    """A gateway serving on a loopback port."""

    port: int
    server: uvicorn.Server

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        """A new raw connection to it."""
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S)
        return conn


@contextmanager
def serving(tmp_path: Path, **settings: Any) -> Iterator[Running]:
    """The gateway app under uvicorn with the gateway's own server options, in a thread."""
    config = Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/", **settings)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    server = uvicorn.Server(uvicorn.Config(create_app(config), **server_options(config)))
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[listener])), daemon=True
    )
    thread.start()
    _wait_until(lambda: server.started, "the server to start")
    try:
        yield Running(listener.getsockname()[1], server)
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        listener.close()


def _wait_until(done: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    """A response read off a raw connection."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        """The API error it carries (and it must carry one, as JSON)."""
        assert self.headers.get("content-type") == "application/json", self.headers
        error: dict[str, str] = json.loads(self.body)["error"]
        return error


def _read_answer(conn: socket.socket) -> Answer:
    """One whole response (it has a Content-Length: every error here does)."""
    conn.settimeout(DEADLINE_S)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        assert piece, f"the connection closed before an answer came: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = conn.recv(65536)
        assert piece, "the connection closed inside the answer's body"
        body += piece
    return Answer(int(status_line.split()[1]), headers, body[:length])


def _closed_by_server(conn: socket.socket) -> bool:
    """Whether the server has closed this connection (reading what it sent meanwhile)."""
    try:
        while select.select([conn], [], [], 0)[0]:
            if not conn.recv(65536):
                return True
    except OSError:
        return True
    return False


def _trickle(conn: socket.socket, byte: bytes) -> bool:
    """Send one more byte; False once the server has closed the connection."""
    if _closed_by_server(conn):
        return False
    try:
        conn.send(byte)
    except OSError:
        return False
    return True


def _trickle_until_closed(conns: list[socket.socket], byte: bytes, while_open: Any) -> None:
    """Trickle a byte to every connection every 0.2 s until the server closed them all."""
    deadline = time.monotonic() + DEADLINE_S
    open_ones = list(conns)
    while open_ones:
        assert time.monotonic() < deadline, f"{len(open_ones)} slow connections stayed open"
        open_ones = [c for c in open_ones if _trickle(c, byte)]
        if open_ones:
            while_open()
        time.sleep(0.2)


def _healthz(running: Running) -> None:
    answer = httpx.get(f"{running.url}/healthz", timeout=DEADLINE_S)
    assert answer.status_code == 200, answer.text


# ---- heads ---------------------------------------------------------------------------------


def test_slow_heads_are_closed_while_healthz_answers(tmp_path: Path) -> None:
    with serving(tmp_path, header_timeout_s=1.0, max_connections=64) as running:
        slow = [running.connect() for _ in range(150)]
        for conn in slow:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answered: list[int] = []

        def meanwhile() -> None:
            # A fresh client is answered while the slow ones hold (or held) every slot.
            _healthz(running)
            answered.append(1)

        _trickle_until_closed(slow, b"a", meanwhile)

        assert answered
        _healthz(running)
        _wait_until(lambda: len(running.server.server_state.connections) == 0, "no connections")


def test_a_silent_connection_is_closed_after_the_head_timeout(tmp_path: Path) -> None:
    with serving(tmp_path, header_timeout_s=1.0) as running:
        silent = running.connect()
        _wait_until(lambda: _closed_by_server(silent), "the silent connection to be closed")


def test_a_kept_alive_connection_trickling_its_next_head_is_closed(tmp_path: Path) -> None:
    with serving(tmp_path, header_timeout_s=1.0) as running:
        conn = running.connect()
        conn.sendall(_head("GET", "/healthz"))
        assert _read_answer(conn).status == 200
        conn.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        _trickle_until_closed([conn], b"a", lambda: None)


def test_a_malformed_request_is_answered_400_in_the_api_shape(tmp_path: Path) -> None:
    with serving(tmp_path) as running:
        conn = running.connect()
        conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = _read_answer(conn)
        assert answer.status == 400
        assert answer.error()["code"] == "invalid_http"


# ---- bodies --------------------------------------------------------------------------------


# A new document, and a new version of one (its body is read before the route looks it up).
UPLOADS = [("POST", "/v1/documents"), ("PUT", "/v1/documents/d0c")]


@pytest.mark.parametrize(("method", "path"), UPLOADS)
def test_a_keyless_upload_is_refused_before_its_body_is_read(
    tmp_path: Path, method: str, path: str
) -> None:
    with serving(tmp_path, api_keys="right-key") as running:
        conn = running.connect()
        conn.sendall(
            _head(
                method,
                path,
                "Transfer-Encoding: chunked",
                f"Content-Type: {MULTIPART}",
            )
        )
        # A first chunk, and then nothing: the answer must not wait for the rest.
        conn.sendall(_chunk(PART_HEAD + b"x" * 0x10000))
        answer = _read_answer(conn)
        assert answer.status == 401
        assert answer.error()["code"] == "unauthorized"


@pytest.mark.parametrize(("method", "path"), UPLOADS)
def test_a_chunked_upload_is_cut_off_at_the_limit(tmp_path: Path, method: str, path: str) -> None:
    total = 64 * MIB
    chunk = _chunk(b"x" * 0x10000)
    with serving(tmp_path, max_upload_bytes=MIB) as running:
        conn = running.connect()
        conn.sendall(
            _head(
                method,
                path,
                "Transfer-Encoding: chunked",
                f"Content-Type: {MULTIPART}",
            )
        )
        conn.sendall(_chunk(PART_HEAD))
        conn.setblocking(False)
        sent = 0
        pending = b""
        # Send while the server reads; stop as soon as it answers.
        while sent < total:
            readable, writable, _ = select.select([conn], [conn], [], DEADLINE_S)
            if readable:
                break
            if writable:
                pending = pending or chunk
                n = conn.send(pending)
                pending = pending[n:]
                sent += n
        conn.setblocking(True)
        answer = _read_answer(conn)

        assert answer.status == 413
        assert answer.error()["code"] == "file_too_large"
        # Answered long before the client was done: the server stopped reading at the limit.
        assert sent < total // 2, f"{sent} bytes were taken before the answer"
        # What the client still sends is drained for a while, then the connection is closed.
        _trickle_until_closed([conn], b"x", lambda: None)


def test_a_stalled_body_is_answered_408(tmp_path: Path) -> None:
    with serving(tmp_path, body_timeout_s=1.0) as running:
        conn = running.connect()
        conn.sendall(
            _head("POST", "/v1/documents", "Content-Length: 1000", f"Content-Type: {MULTIPART}")
        )
        conn.sendall(PART_HEAD)
        answer = _read_answer(conn)
        assert answer.status == 408
        assert answer.error()["code"] == "body_timeout"
        assert "SLUICE_BODY_TIMEOUT_S" in answer.error()["message"]


# ---- the connection limit ----------------------------------------------------------------


def test_past_the_limit_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    # No head deadline in reach: only the limit can close the idle ones.
    with serving(tmp_path, max_connections=3, header_timeout_s=600) as running:
        idle = [running.connect() for _ in range(3)]
        _wait_until(lambda: len(running.server.server_state.connections) == 3, "3 connections")

        _healthz(running)

        # The first to connect has waited longest: it made room; the others are untouched.
        _wait_until(lambda: _closed_by_server(idle[0]), "the longest idle to be closed")
        assert not any(_closed_by_server(c) for c in idle[1:])


def test_past_the_limit_with_every_connection_busy_a_newcomer_is_refused_503(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, max_connections=3, body_timeout_s=600) as running:
        busy = [running.connect() for _ in range(3)]
        for conn in busy:
            conn.sendall(
                _head("POST", "/v1/documents", "Content-Length: 1000", f"Content-Type: {MULTIPART}")
            )
        # Each is in a request (the app waits for its body): none may be closed for room.
        _wait_until(lambda: len(running.server.server_state.tasks) == 3, "3 requests in hand")

        answer = _read_answer(running.connect())

        assert answer.status == 503
        assert answer.error()["code"] == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        for conn in busy:
            with suppress(OSError):
                conn.close()
        _wait_until(lambda: len(running.server.server_state.tasks) == 0, "the requests to end")
        _healthz(running)
