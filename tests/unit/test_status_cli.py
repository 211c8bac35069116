"""`sluice status` as a process against a stand-in gateway whose answer is built by the real
`PipelineHealth` (so the command reads the shape the gateway really sends): the stage and
worker rows, `--json`, `--watch` until Ctrl-C, a stale answer, and a gateway that is not there."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts.events import WorkerHeartbeat
from gateway.cli.supervisor import sluice_command
from gateway.http.pipeline_health import PipelineHealth

KEY = "status-key"


def canned_answer(*, stale: bool = False) -> dict[str, Any]:
    """Two parse workers (one gone quiet), a busy bulk lane, an idle webhook side stage."""
    now = datetime.now(UTC)
    health = PipelineHealth(("parse", "chunk"), ("webhook",), started_at=now - timedelta(hours=1))

    def beat(worker: str, pid: int, **fields: Any) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            worker_id=worker,
            stage="parse",
            host="box-1",
            pid=pid,
            sluice_version="0.1.0",
            started_at=now,
            every_s=1.0,
            **fields,
        )

    health.hear(beat("quiet", 101, processed=4), now=0.0, now_at=now - timedelta(seconds=95))
    health.hear(
        beat("busy", 102, processed=40, failed=2, in_hand={"bulk": 3}, in_hand_jobs=["j1", "j2"]),
        now=100.0,
        now_at=now,
    )
    health.record(
        "parse", {"interactive": 1, "bulk": 17}, {"interactive": 2, "bulk": 2}, 100.0, now
    )
    answer = health.snapshot(100.0, stale=stale, gateway_id="gw-1")
    body: dict[str, Any] = answer.model_dump(mode="json", by_alias=True)
    return body


class StandIn:
    """Answers `GET /v1/pipeline` with `answer`, to the right key only."""

    def __init__(self) -> None:
        self.answer = canned_answer()
        self.app = Starlette(routes=[Route("/v1/pipeline", self.pipeline)])

    async def pipeline(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            error = {"code": "unauthorized", "message": "Send a valid API key."}
            return JSONResponse({"error": error}, status_code=401)
        return JSONResponse(self.answer)


@pytest.fixture
def stand_in() -> Iterator[tuple[StandIn, str]]:
    """The stand-in served by uvicorn on a free loopback port, with its URL."""
    fake = StandIn()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the stand-in gateway did not start"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def env(api_key: str | None = KEY) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return clean | ({"SLUICE_API_KEY": api_key} if api_key else {})


def status(*args: str, api_key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    """Run the real `sluice status` (stdout is a pipe, so tab-separated tables)."""
    return subprocess.run(
        [*sluice_command(), "status", *args],
        capture_output=True,
        text=True,
        env=env(api_key),
        timeout=60,
        check=False,
    )


def rows(output: str) -> list[list[str]]:
    return [line.split("\t") for line in output.splitlines() if "\t" in line]


def test_a_row_per_stage_then_a_row_per_worker(stand_in: tuple[StandIn, str]) -> None:
    _, url = stand_in
    result = status("--url", url)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    header = table[0]
    assert header == [
        "stage",
        "ready i/b",
        "unacked i/b",
        "consumers",
        "in/s",
        "out/s",
        "workers ok/all",
    ]
    by_stage = {row[0]: dict(zip(header, row, strict=True)) for row in table[1:4]}
    assert list(by_stage) == ["parse", "chunk", "webhook (side)"]
    parse = by_stage["parse"]
    assert (parse["ready i/b"], parse["unacked i/b"], parse["consumers"]) == ("1/17", "0/3", "2")
    assert parse["workers ok/all"] == "1/2"
    assert by_stage["chunk"]["workers ok/all"] == "0/0"

    worker_header = table[4]
    assert worker_header[:2] == ["stage", "worker"] and worker_header[-1] == "healthy"
    workers = {row[1]: dict(zip(worker_header, row, strict=True)) for row in table[5:]}
    assert set(workers) == {"quiet", "busy"}
    busy, quiet = workers["busy"], workers["quiet"]
    assert (busy["pid"], busy["processed"], busy["failed"], busy["in hand"]) == (
        "102",
        "40",
        "2",
        "3",
    )
    assert (busy["healthy"], quiet["healthy"]) == ("yes", "NO")
    assert quiet["last seen"] == "1m ago" and busy["last seen"].endswith("s ago")
    assert "stale" not in result.stdout


def test_json_prints_the_gateways_answer(stand_in: tuple[StandIn, str]) -> None:
    fake, url = stand_in
    result = status("--url", url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == fake.answer


def test_a_stale_answer_says_so(stand_in: tuple[StandIn, str]) -> None:
    fake, url = stand_in
    fake.answer = canned_answer(stale=True)
    result = status("--url", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stale: the gateway cannot reach RabbitMQ")


def test_no_gateway_answering_exits_1_saying_so() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    result = status("--url", url)
    assert result.returncode == 1
    assert result.stderr.strip() == f"no Sluice gateway answers at {url}; start it with `sluice up`"
    assert result.stdout == ""


def test_a_refused_key_exits_1_with_the_gateways_reason(stand_in: tuple[StandIn, str]) -> None:
    _, url = stand_in
    result = status("--url", url, api_key="wrong")
    assert result.returncode == 1
    assert "unauthorized: Send a valid API key." in result.stderr


def test_watch_redraws_until_ctrl_c(stand_in: tuple[StandIn, str]) -> None:
    _, url = stand_in
    process = subprocess.Popen(
        [*sluice_command(), "status", "--url", url, "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert process.stdout is not None
    try:
        draws = 0
        deadline = time.monotonic() + 30
        # Read until the third drawing has begun: two complete ones lie before it.
        for line in process.stdout:
            draws += line.startswith("stage\tready")
            if draws == 3:
                break
            assert time.monotonic() < deadline, "status --watch did not redraw"
        assert draws == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
