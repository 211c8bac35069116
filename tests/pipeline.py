"""A real Sluice for tests: gateway and four stage processes, started as a user would
(`sluice gateway`, `sluice stage NAME`), on the suite's broker, with their own namespace and
data directory so runs never see each other's queues or files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from broker import BrokerHandle

from contracts.pipeline import DEFAULT_STAGES
from contracts.settings import Settings

TERMINAL = {"indexed", "failed"}
# Small limits make the limit paths cheap to test; retries fail fast.
MAX_UPLOAD_BYTES = 1 << 20


@dataclass
class Pipeline:
    """A running Sluice: where it answers and the environment its processes share."""

    url: str
    env: dict[str, str]
    data_dir: Path
    log_dir: Path
    namespace: str
    commands: dict[str, list[str]]
    # The stages this pipeline runs, in order (from SLUICE_STAGES).
    stages: tuple[str, ...] = ()
    # Settings of one process only (its own port, its own data directory), over `env`.
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        """Start (or start again) one process; its output is appended to its log."""
        log = (self.log_dir / f"{name}.log").open("ab")
        env = {**self.env, **self.process_env.get(name, {})}
        self.processes[name] = subprocess.Popen(
            self.commands[name], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def settings(self) -> Settings:
        """The settings every process of this pipeline runs with, read as they read them."""
        with mock.patch.dict(os.environ, self.env, clear=True):
            return Settings()

    def terminate(self, name: str, timeout_s: float = 60.0) -> int:
        """SIGTERM one process, as an orchestrator stopping it would; returns its exit code."""
        process = self.processes[name]
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout_s)

    def kill(self, name: str) -> None:
        """`kill -9` one process, as the OOM killer or a segfault would."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def log_mark(self, name: str) -> int:
        """Where one process's log ends now, to read only what it writes after (`log_since`)."""
        path = self.log_dir / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, name: str, mark: int) -> str:
        """What one process (or the one started in its place) logged since `mark`."""
        with (self.log_dir / f"{name}.log").open("rb") as log:
            log.seek(mark)
            return log.read().decode(errors="replace")

    def logs(self) -> str:
        """The tail of every process's log, for a failing test's report."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sluice_command() -> list[str]:
    """The `sluice` console script of this environment."""
    script = Path(sys.executable).parent / "sluice"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli.main"]


def queue_depth(broker: BrokerHandle, name: str) -> int:
    """How many messages a queue holds, from the management API."""
    user, password = credentials(broker.amqp_url)
    answer = httpx.get(
        f"{broker.management_url}/api/queues/%2F/{name}", auth=(user, password), timeout=5
    )
    depth: int = answer.json().get("messages", 0) if answer.status_code == 200 else 0
    return depth


def queue_consumers(broker: BrokerHandle, name: str) -> int:
    """How many consumers a queue has, from the management API."""
    user, password = credentials(broker.amqp_url)
    answer = httpx.get(
        f"{broker.management_url}/api/queues/%2F/{name}", auth=(user, password), timeout=5
    )
    if answer.status_code != 200:
        return 0
    consumers: int = answer.json().get("consumers", 0)
    return consumers


def credentials(amqp_url: str) -> tuple[str, str]:
    """User and password of an AMQP URL (guest/guest when it names none)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(amqp_url)
    return unquote(parts.username or "guest"), unquote(parts.password or "guest")


def _wait_ready(pipeline: Pipeline, broker: BrokerHandle, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    queues = [f"{pipeline.namespace}.stage.{s}" for s in pipeline.stages]
    while time.monotonic() < deadline:
        for name, process in pipeline.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{pipeline.logs()}")
        try:
            ready = httpx.get(f"{pipeline.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and all(queue_consumers(broker, q) >= 1 for q in queues):
            return
        time.sleep(0.25)
    raise RuntimeError(f"the pipeline did not become ready in {deadline_s}s\n{pipeline.logs()}")


def start_pipeline(broker: BrokerHandle, root: Path, **settings: str) -> Pipeline:
    """Start gateway and stages as real processes; returns once every stage consumes."""
    return launch(broker, root, settings)


def launch(
    broker: BrokerHandle,
    root: Path,
    settings: dict[str, str],
    commands: dict[str, list[str]] | None = None,
    process_env: dict[str, dict[str, str]] | None = None,
    namespace: str | None = None,
) -> Pipeline:
    """`start_pipeline`, where `commands` may replace or add a process (a test double of a
    stage, a second gateway), `process_env` gives one process settings of its own and
    `namespace` is the queue prefix (a fresh one unless given)."""
    namespace = namespace or f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Names only: a plug-in stage's module is on the processes' PYTHONPATH, maybe not ours.
    chosen = settings.get("SLUICE_STAGES", DEFAULT_STAGES)
    stages = tuple(name.strip() for name in chosen.split(",") if name.strip())
    env = {
        **os.environ,
        "SLUICE_AMQP_URL": broker.amqp_url,
        "SLUICE_NAMESPACE": namespace,
        "SLUICE_DATA_DIR": str(root / "data"),
        "SLUICE_HOST": "127.0.0.1",
        "SLUICE_PORT": str(port),
        "SLUICE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "SLUICE_RETRY_DELAYS_S": "[1]",
        "SLUICE_MAX_ATTEMPTS": "2",
        # Free ports: several test pipelines may run stage processes on one machine.
        **{f"SLUICE_{stage.upper()}_METRICS_PORT": "0" for stage in stages},
        **settings,
    }
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    programs: dict[str, list[str]] = {"gateway": [*sluice_command(), "gateway"]}
    programs |= {stage: [*sluice_command(), "stage", stage] for stage in stages}
    pipeline = Pipeline(
        url=f"http://127.0.0.1:{port}",
        env=env,
        data_dir=root / "data",
        log_dir=log_dir,
        namespace=namespace,
        commands={**programs, **(commands or {})},
        stages=stages,
        process_env=process_env or {},
    )
    for name in pipeline.commands:
        pipeline.start(name)
    try:
        _wait_ready(pipeline, broker)
    except BaseException:
        stop_pipeline(pipeline)
        raise
    return pipeline


def run_sluice(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `sluice` command line against the pipeline, without a terminal."""
    return subprocess.run(
        [*sluice_command(), *args],
        env=pipeline.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def stop_pipeline(pipeline: Pipeline) -> None:
    """SIGTERM every process and wait; SIGKILL what does not stop in time."""
    for process in pipeline.processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in pipeline.processes.values():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_for_job(
    client: httpx.AsyncClient, job_id: str, deadline_s: float = 180.0
) -> dict[str, Any]:
    """Follow a job's live event stream until it is indexed or failed (or the deadline)."""
    last: dict[str, Any] = {}
    async with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(deadline_s)
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
                if last["status"] in TERMINAL:
                    return last
    raise AssertionError(f"the event stream of job {job_id} ended before the job did: {last}")
