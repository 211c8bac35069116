"""/openapi.json tells the truth: schemathesis fuzzes a real gateway over HTTP from it.

Every answer must be documented (status, content type, body schema, required headers) and
none may be a 500. The gateway runs alone (no stage processes) on the suite's RabbitMQ, so
uploads are accepted and wait. Each run is bounded (examples per operation, one worker,
deterministic generation), so it takes the same path and about the same time every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from pipeline import free_port, sluice_command

pytestmark = pytest.mark.integration

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
# Per operation: enough to reach each route's errors and some accepted uploads, few enough
# for a run to take seconds on two slow cores.
MAX_EXAMPLES = 25
# The first search loads the embedding model inside the gateway.
REQUEST_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
# An unrestricted key reaches every route's success; one limited to `default`, the 403s.
KEYS = "root,restricted:default"
# An event stream of a job that never ends (no stages run here) is read up to its first
# event, the one sent at connect, not until the request times out.
CONFIG = "max-stream-events = 1\n"


@dataclass(frozen=True)
class Gateway:
    """A running gateway: where it answers, and its log for a failing test's report."""

    url: str
    log: Path


@contextmanager
def running_gateway(broker: BrokerHandle, root: Path, **settings: str) -> Iterator[Gateway]:
    """`sluice gateway` alone, on a free loopback port, until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "SLUICE_AMQP_URL": broker.amqp_url,
        "SLUICE_NAMESPACE": f"t{uuid.uuid4().hex[:8]}",
        "SLUICE_DATA_DIR": str(root / "data"),
        "SLUICE_HOST": "127.0.0.1",
        "SLUICE_PORT": str(port),
        "SLUICE_MAX_UPLOAD_BYTES": str(1 << 20),
        **settings,
    }
    gateway = Gateway(f"http://127.0.0.1:{port}", root / "gateway.log")
    with gateway.log.open("ab") as output:
        process = subprocess.Popen(
            [*sluice_command(), "gateway"], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(gateway, process)
        yield gateway
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(gateway: Gateway, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}:\n{_tail(gateway)}")
        try:
            if httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the gateway did not become ready in 120 s:\n{_tail(gateway)}")


def _tail(gateway: Gateway, lines: int = 40) -> str:
    return "\n".join(gateway.log.read_text(errors="replace").splitlines()[-lines:])


def served_schema(gateway: Gateway) -> dict[str, Any]:
    """The gateway's /openapi.json, as a client reads it."""
    answer = httpx.get(f"{gateway.url}/openapi.json", timeout=30)
    assert answer.status_code == 200, answer.text
    schema: dict[str, Any] = answer.json()
    return schema


def schemathesis(
    gateway: Gateway,
    schema: dict[str, Any],
    work_dir: Path,
    *extra: str,
    checks: tuple[str, ...] = CHECKS,
    max_examples: int = MAX_EXAMPLES,
) -> subprocess.CompletedProcess[str]:
    """Run `schemathesis run` (the CLI, as CI would) from `schema` against the gateway.

    The schema is handed over as a file: a run that sends a foreign Host could not fetch it.
    """
    config = work_dir / "schemathesis.toml"
    config.write_text(CONFIG)
    schema_file = work_dir / "openapi.json"
    schema_file.write_text(json.dumps(schema))
    return subprocess.run(
        [
            *[sys.executable, "-m", "schemathesis.cli"],
            *["--config-file", str(config), "--no-color", "run", str(schema_file)],
            *["--url", gateway.url, "--checks", ",".join(checks)],
            # The schema declares no links, so a stateful phase would have nothing to follow.
            *["--phases", "examples,coverage,fuzzing"],
            *["--max-examples", str(max_examples), "--generation-deterministic"],
            *["--workers", "1", "--request-timeout", str(REQUEST_TIMEOUT_S)],
            *extra,
        ],
        cwd=work_dir,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def report(run: subprocess.CompletedProcess[str], gateway: Gateway) -> str:
    """What a failing run said, and what the gateway logged meanwhile."""
    return f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}\n--- gateway log\n{_tail(gateway)}"


@pytest.fixture(scope="module")
def open_gateway(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway without API keys."""
    with running_gateway(broker, tmp_path_factory.mktemp("open")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def keyed_gateway(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway with an unrestricted and a restricted API key."""
    with running_gateway(broker, tmp_path_factory.mktemp("keyed"), SLUICE_API_KEYS=KEYS) as gw:
        yield gw


def test_an_open_gateway_answers_as_its_openapi_says(open_gateway: Gateway, tmp_path: Path) -> None:
    """Also: an undeclared method is a 405 that names the declared ones (`Allow`)."""
    run = schemathesis(
        open_gateway,
        served_schema(open_gateway),
        tmp_path,
        checks=(*CHECKS, "unsupported_method"),
    )

    assert run.returncode == 0, report(run, open_gateway)


@pytest.mark.parametrize("key", ["root", "restricted", None])
def test_a_keyed_gateway_answers_as_its_openapi_says(
    keyed_gateway: Gateway, tmp_path: Path, key: str | None
) -> None:
    """With each kind of key, and with none (every /v1 route but the config answers 401)."""
    auth = ["--header", f"Authorization: Bearer {key}"] if key else []

    run = schemathesis(keyed_gateway, served_schema(keyed_gateway), tmp_path, *auth)

    assert run.returncode == 0, report(run, keyed_gateway)


@pytest.mark.parametrize("header", ["Host: elsewhere.example", "Origin: http://elsewhere.example"])
def test_the_boundarys_refusals_are_declared_where_it_gives_them(
    open_gateway: Gateway, tmp_path: Path, header: str
) -> None:
    """A foreign Host (421 but on the probes) and a foreign page's changes (403)."""
    schema = served_schema(open_gateway)

    run = schemathesis(open_gateway, schema, tmp_path, "--header", header, max_examples=5)

    assert run.returncode == 0, report(run, open_gateway)


def test_the_check_catches_a_schema_that_lies(open_gateway: Gateway, tmp_path: Path) -> None:
    """The schema as FastAPI wrote it before: 422 for bad input, where errors.py answers 400."""
    schema = served_schema(open_gateway)
    search = schema["paths"]["/v1/search"]["get"]["responses"]
    search["422"] = search.pop("400")

    run = schemathesis(open_gateway, schema, tmp_path, "--include-path", "/v1/search")

    assert run.returncode != 0, report(run, open_gateway)
    assert "Undocumented status code" in run.stdout, run.stdout
    assert "Received: 400" in run.stdout, run.stdout
