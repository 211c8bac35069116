"""The `sluice` command line against a fake gateway, and `sluice up`'s supervisor, as processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.cli.supervisor import default_children, sluice_command

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


def _job(job_id: str, filename: str, status: str, **extra: Any) -> dict[str, Any]:
    chunks_total = 3 if status in ("chunking", "embedding", "indexing", "indexed") else None
    return {
        "job_id": job_id,
        "document_id": "doc-" + job_id,
        "collection": "default",
        "filename": filename,
        "status": status,
        "progress": {
            "pages": None,
            "chunks_total": chunks_total,
            "chunks_embedded": 3 if status in ("indexing", "indexed") else 0,
            "chunks_indexed": 3 if status == "indexed" else 0,
        },
        "error": None,
        "created_at": "2024-05-01T12:00:00Z",
        "updated_at": f"2024-05-01T12:00:0{len(status) % 10}Z",
        **extra,
    }


class FakeGateway:
    """A test double for the Sluice HTTP API, steered by each uploaded file's content.

    `%BINARY` → 415; `BROKEN` → the job fails in parse; `SATURATE` → 429 on the first try;
    `DROPSTREAM` → the event stream ends early (the client must poll); equal bytes → duplicate.
    """

    def __init__(self) -> None:
        self.uploads: list[str] = []
        self.priorities: list[str] = []
        self.scripts: dict[str, list[dict[str, Any]]] = {}
        self.drop_stream: set[str] = set()
        self.by_sha: dict[str, dict[str, Any]] = {}
        self.saturated_once: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/v1/documents", self.upload, methods=["POST"]),
                Route("/v1/jobs", self.list_jobs),
                Route("/v1/jobs/{job_id}", self.get_job),
                Route("/v1/jobs/{job_id}/events", self.events),
                Route("/v1/search", self.search),
            ]
        )

    @staticmethod
    def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
        body = {"error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") == f"Bearer {API_KEY}":
            return None
        return self._error(401, "unauthorized", "missing or wrong API key")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def upload(self, request: Request) -> Response:
        if denied := self._unauthorized(request):
            return denied
        form = await request.form()
        upload = form["file"]
        assert not isinstance(upload, str)
        data, filename = await upload.read(), upload.filename or "unnamed"
        self.uploads.append(filename)
        self.priorities.append(str(form.get("priority")))
        if data.startswith(b"%BINARY"):
            return self._error(415, "unsupported_media_type", "binary files are not supported")
        sha = hashlib.sha256(data).hexdigest()
        if b"SATURATE" in data and sha not in self.saturated_once:
            self.saturated_once.add(sha)
            return self._error(429, "pipeline_saturated", "try later", **{"Retry-After": "0"})
        if sha in self.by_sha:
            return JSONResponse({**self.by_sha[sha], "duplicate": True}, status_code=200)
        job_id = uuid.uuid4().hex
        statuses = ["queued", "parsing", "chunking", "embedding", "indexing", "indexed"]
        script = [_job(job_id, filename, status) for status in statuses]
        if b"BROKEN" in data:
            error = {"stage": "parse", "code": "parse_failed", "message": "cannot read it"}
            script = [*script[:2], _job(job_id, filename, "failed", error=error)]
        if b"DROPSTREAM" in data:
            self.drop_stream.add(job_id)
        self.scripts[job_id] = script
        accepted = {
            "job_id": job_id,
            "document_id": "doc-" + job_id,
            "collection": form.get("collection", "default"),
            "filename": filename,
            "status": "queued",
            "status_url": f"/v1/jobs/{job_id}",
        }
        self.by_sha[sha] = accepted
        return JSONResponse(accepted, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    async def get_job(self, request: Request) -> Response:
        script = self.scripts.get(request.path_params["job_id"])
        if script is None:
            return self._error(404, "job_not_found", "no such job")
        # A poller sees the job already finished.
        return JSONResponse(script[-1])

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        script = self.scripts.get(job_id)
        if script is None:
            return self._error(404, "job_not_found", "no such job")
        sent = script[:1] if job_id in self.drop_stream else script

        async def stream() -> AsyncIterator[str]:
            for job in sent:
                yield f"event: status\ndata: {json.dumps(job)}\n\n"
                await asyncio.sleep(0.02)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def list_jobs(self, request: Request) -> Response:
        jobs = [script[-1] for script in self.scripts.values()]
        if status := request.query_params.get("status"):
            jobs = [job for job in jobs if job["status"] == status]
        return JSONResponse({"jobs": jobs, "next_cursor": None})

    async def search(self, request: Request) -> Response:
        hit = {
            "document_id": "doc-1",
            "filename": "guide.md",
            "chunk_id": "c1",
            "chunk_index": 0,
            "page": 2,
            "text": f"All about {request.query_params['q']}.\n  Really.",
            "score": 0.8125,
        }
        return JSONResponse({"results": [hit]})


@pytest.fixture
def fake_gateway() -> Iterator[tuple[FakeGateway, str]]:
    """A FakeGateway served by uvicorn on a free loopback port, with its URL."""
    fake = FakeGateway()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "FakeGateway did not start"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def sluice(*args: str, api_key: str | None = API_KEY) -> subprocess.CompletedProcess[str]:
    """Run the real `sluice` console script (stdout is a pipe, so plain output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    if api_key is not None:
        env["SLUICE_API_KEY"] = api_key
    return subprocess.run(
        [*sluice_command(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_ingest_follows_every_file_and_summarises(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    fake, url = fake_gateway
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".hidden").mkdir()
    (docs / "a.md").write_text("# Hello\n")
    (docs / "sub" / "b.txt").write_text("plain text")
    (docs / "c.bin").write_bytes(b"%BINARY\x00\x01")
    (docs / "d.txt").write_text("BROKEN document")
    (docs / "e.txt").write_text("SATURATE once")
    (docs / "f.txt").write_text("DROPSTREAM please")
    (docs / "g.md").write_text("# Hello\n")
    (docs / ".secret.txt").write_text("never uploaded")
    (docs / ".hidden" / "x.txt").write_text("never uploaded")

    result = sluice("ingest", str(docs), "--url", url, "--concurrency", "2")

    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    # g.md repeats a.md's bytes: no new work, so it is counted apart from the indexed.
    summary = "4 indexed, 2 failed, 1 duplicate (already indexed)"
    assert summary in lines
    failures = lines[lines.index(summary) + 1 :]
    assert failures == [
        "  c.bin: [upload] unsupported_media_type: binary files are not supported",
        "  d.txt: [parse] parse_failed: cannot read it",
    ]
    assert "indexed  sub/b.txt (3 chunks)" in lines
    assert "indexed  f.txt (3 chunks)" in lines
    assert sorted(set(fake.uploads)) == [
        "a.md",
        "b.txt",
        "c.bin",
        "d.txt",
        "e.txt",
        "f.txt",
        "g.md",
    ]
    assert fake.uploads.count("e.txt") == 2
    # A folder is an import: its files go in the bulk lane unless told otherwise.
    assert set(fake.priorities) == {"bulk"}


def test_ingest_exits_zero_when_all_indexed(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    fake, url = fake_gateway
    (tmp_path / "one.txt").write_text("just one")

    result = sluice("ingest", str(tmp_path / "one.txt"), "--url", url)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "1 indexed, 0 failed"
    # Someone who names one file waits for it: interactive.
    assert fake.priorities == ["interactive"]


def test_ingest_with_a_wrong_key_stops_with_the_api_message(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    _, url = fake_gateway
    (tmp_path / "one.txt").write_text("just one")

    result = sluice("ingest", str(tmp_path), "--url", url, api_key="wrong")

    assert result.returncode == 1
    assert "unauthorized: missing or wrong API key" in result.stderr


def test_client_commands_without_a_gateway_say_so(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("just one")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    for args in (["ingest", str(tmp_path)], ["search", "x"], ["jobs"]):
        result = sluice(*args, "--url", url)
        assert result.returncode == 1, args
        assert result.stderr.strip() == (
            f"no Sluice gateway answers at {url}; start it with `sluice up`"
        )


def test_ingest_usage_errors_exit_two(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".only-hidden").write_text("x")

    missing = sluice("ingest", str(tmp_path / "nope"))
    empty = sluice("ingest", str(tmp_path / "empty"))
    bad_collection = sluice("ingest", str(tmp_path), "--collection", "Bad Name")

    assert (missing.returncode, empty.returncode, bad_collection.returncode) == (2, 2, 2)
    assert "path does not exist" in missing.stderr
    assert "no files found" in empty.stderr


def test_search_and_jobs_print_readably(
    fake_gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    _, url = fake_gateway
    (tmp_path / "bad.txt").write_text("BROKEN")
    assert sluice("ingest", str(tmp_path), "--url", url).returncode == 1

    found = sluice("search", "rabbits", "--url", url, "-k", "3")
    failed = sluice("jobs", "--failed", "--url", url)

    assert found.returncode == 0, found.stderr
    assert "0.812  guide.md  p. 2" in found.stdout
    assert "All about rabbits. Really." in found.stdout
    assert failed.returncode == 0, failed.stderr
    # Piped, a long hit stays one line: nothing cuts it at 80 columns mid-sentence.
    long_query = " ".join(["rabbits"] * 30)
    piped = sluice("search", long_query, "--url", url)
    assert f"    All about {long_query}. Really." in piped.stdout.splitlines()
    header, row = failed.stdout.splitlines()
    assert header.split("\t")[:4] == ["job id", "filename", "collection", "status"]
    assert row.split("\t")[1:] == [
        "bad.txt",
        "default",
        "failed",
        "-",
        "2024-05-01 12:00:06",
        "parse_failed",
    ]


def test_python_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "stage", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "parse" in result.stdout


def test_sluice_up_launches_sluice_itself() -> None:
    children = default_children(["parse", "embed"], gateway=True)

    assert [child.name for child in children] == ["gateway", "parse", "embed"]
    assert children[1].argv[-2:] == ("stage", "parse")
    assert children[0].argv[:-1] == tuple(sluice_command())


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 here may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_supervisor_restarts_dying_children_and_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(
        textwrap.dedent(f"""
        import os, time
        with open({str(tmp_path / "flaky.pids")!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        print("flaky up")
        time.sleep(0.05)
        raise SystemExit(3)
        """)
    )
    (tmp_path / "steady.py").write_text(
        textwrap.dedent(f"""
        import os, subprocess, time
        grandchild = subprocess.Popen(["sleep", "300"])
        with open({str(tmp_path / "steady.pids")!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n{{grandchild.pid}}\\n")
        print("steady up", end="")
        time.sleep(300)
        """)
    )
    (tmp_path / "stubborn.py").write_text(
        textwrap.dedent(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open({str(tmp_path / "stubborn.pids")!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(300)
        """)
    )
    driver = textwrap.dedent(f"""
        import sys
        from gateway.cli.supervisor import Backoff, ChildSpec, run_supervisor
        children = [
            ChildSpec(name, (sys.executable, {str(tmp_path)!r} + f"/{{name}}.py"))
            for name in ("flaky", "steady", "stubborn")
        ]
        sys.exit(run_supervisor(children, backoff=Backoff(0.1, 0.4, 60.0), stop_timeout_s=1.0))
        """)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", driver],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while len(_pids(tmp_path / "flaky.pids")) < 5 or not _pids(tmp_path / "stubborn.pids"):
            assert time.monotonic() < deadline, "the supervisor did not restart flaky"
            assert supervisor.poll() is None, supervisor.communicate()[0]
            time.sleep(0.05)
        while len(_pids(tmp_path / "steady.pids")) < 2:
            assert time.monotonic() < deadline, "steady did not start"
            time.sleep(0.05)

        supervisor.send_signal(signal.SIGTERM)
        output, _ = supervisor.communicate(timeout=20)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()

    assert supervisor.returncode == 0, output
    everyone = [_pids(tmp_path / f"{name}.pids") for name in ("flaky", "steady", "stubborn")]
    assert [pid for pids in everyone for pid in pids if _alive(pid)] == []
    assert "[flaky   ] flaky up" in output
    assert "[steady  ] steady up" in output
    restarts = [
        line for line in output.splitlines() if "flaky exited unexpectedly (code 3)" in line
    ]
    assert [line.rsplit(" ", 1)[1] for line in restarts[:4]] == ["0.1s", "0.2s", "0.4s", "0.4s"]
    assert "stubborn did not stop in time; killing it" in output
    # Ended by the SIGTERM it was sent (as uvicorn ends a clean gateway stop): not a failure.
    assert "[sluice  ] steady stopped cleanly" in output
    assert "[sluice  ] stubborn stopped by signal SIGKILL" in output
    assert output.splitlines()[-1] == "[sluice  ] all processes stopped"


def test_a_second_signal_kills_stubborn_children_at_once(tmp_path: Path) -> None:
    (tmp_path / "stubborn.py").write_text(
        textwrap.dedent(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open({str(tmp_path / "stubborn.pids")!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(300)
        """)
    )
    driver = textwrap.dedent(f"""
        import sys
        from gateway.cli.supervisor import ChildSpec, run_supervisor
        child = ChildSpec("stubborn", (sys.executable, {str(tmp_path / "stubborn.py")!r}))
        sys.exit(run_supervisor([child], stop_timeout_s=60.0))
        """)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not _pids(tmp_path / "stubborn.pids"):
            assert time.monotonic() < deadline, "stubborn did not start"
            time.sleep(0.05)
        supervisor.send_signal(signal.SIGINT)
        time.sleep(0.3)
        supervisor.send_signal(signal.SIGINT)
        output, _ = supervisor.communicate(timeout=10)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()

    assert supervisor.returncode == 0, output
    assert "killing stubborn as asked" in output
    assert not any(_alive(pid) for pid in _pids(tmp_path / "stubborn.pids"))


def test_stopping_does_not_depend_on_the_output_reader(tmp_path: Path) -> None:
    """`sluice up | tee log` then Ctrl-C: tee dies first; the supervisor must still stop all."""
    (tmp_path / "steady.py").write_text(
        textwrap.dedent(f"""
        import os, time
        with open({str(tmp_path / "steady.pids")!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        while True:
            print("still here", flush=True)
            time.sleep(0.05)
        """)
    )
    driver = textwrap.dedent(f"""
        import sys
        from gateway.cli.supervisor import ChildSpec, run_supervisor
        child = ChildSpec("steady", (sys.executable, {str(tmp_path / "steady.py")!r}))
        sys.exit(run_supervisor([child], stop_timeout_s=10.0))
        """)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert supervisor.stdout is not None
        lines = iter(supervisor.stdout.readline, "")
        assert any("still here" in line for line, _ in zip(lines, range(20), strict=False))
        supervisor.stdout.close()  # the reader goes away, as tee does on Ctrl-C
        supervisor.send_signal(signal.SIGINT)
        supervisor.wait(timeout=15)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert supervisor.returncode == 0
    assert not any(_alive(pid) for pid in _pids(tmp_path / "steady.pids"))
