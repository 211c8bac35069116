"""A stage asked to stop exits at once with code 0, whatever it is doing: loading its model,
connecting to a broker that does not answer, or consuming.

Each test runs a real `sluice stage embed` process and sends it SIGTERM, as `sluice up` and
Kubernetes do, and gives it `STOP_GRACE_S` to exit: generous (a stage that holds nothing
exits within a second), and well inside the grace `sluice up` gives before it kills.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import BrokerHandle
from pipeline import queue_consumers, sluice_command

from contracts import routing
from gateway.cli.supervisor import run_supervisor
from stages.backends.embedder import packaged_model_dir
from stages.runtime.runner import StageRunner

STOP_GRACE_S = 20.0


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """An AMQP URL whose server accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/"
    server.close()
    for connection in held:
        connection.close()


@pytest.fixture
def never_loading_model(tmp_path: Path) -> Path:
    """A model directory whose loading never ends: `modules.json` is a FIFO nobody writes."""
    model = tmp_path / "model"
    model.mkdir()
    for item in packaged_model_dir().iterdir():
        (model / item.name).symlink_to(item)
    (model / "modules.json").unlink()
    os.mkfifo(model / "modules.json")
    return model


@dataclass
class Embed:
    """A running `sluice stage embed`: the process, its log and its namespace."""

    process: subprocess.Popen[bytes]
    log: Path
    namespace: str


def start_embed(tmp_path: Path, amqp_url: str, **settings: str) -> Embed:
    """`sluice stage embed` on a namespace and data directory of its own."""
    log = tmp_path / "embed.log"
    namespace = f"t{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SLUICE_AMQP_URL": amqp_url,
        "SLUICE_NAMESPACE": namespace,
        "SLUICE_DATA_DIR": str(tmp_path / "data"),
        "SLUICE_EMBED_METRICS_PORT": "0",
        **settings,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*sluice_command(), "stage", "embed"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Embed(process, log, namespace)


def wait_for_line(embed: Embed, text: str) -> None:
    """Wait until the stage has logged `text` (it must still be running then)."""
    deadline = time.monotonic() + 120
    while text not in embed.log.read_text(errors="replace"):
        assert embed.process.poll() is None, (
            f"embed exited with {embed.process.returncode}:\n{tail(embed)}"
        )
        assert time.monotonic() < deadline, f"embed never logged {text!r}:\n{tail(embed)}"
        time.sleep(0.1)


def stop(embed: Embed) -> int:
    """SIGTERM the stage; its exit code, or a failure saying what it was doing if it still
    runs when `sluice up` would kill it."""
    embed.process.send_signal(signal.SIGTERM)
    try:
        return embed.process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        embed.process.kill()
        embed.process.wait()
        pytest.fail(f"embed did not exit within {STOP_GRACE_S:g}s of SIGTERM:\n{tail(embed)}")


def tail(embed: Embed) -> str:
    """The last lines of the stage's log, for a failure's report."""
    return "\n".join(embed.log.read_text(errors="replace").splitlines()[-15:])


def test_a_stage_stopped_while_loading_its_model_exits_at_once(
    tmp_path: Path, broker: BrokerHandle, never_loading_model: Path
) -> None:
    embed = start_embed(tmp_path, broker.amqp_url, SLUICE_MODEL_DIR=str(never_loading_model))
    # Logged just before the stage's startup begins; its model load never ends.
    wait_for_line(embed, "metrics on http")
    assert stop(embed) == 0
    assert "stage embed stopped while starting" in embed.log.read_text(), tail(embed)


def test_a_stage_stopped_while_connecting_exits_at_once(tmp_path: Path, silent_broker: str) -> None:
    embed = start_embed(tmp_path, silent_broker)
    # The model is loaded; the broker takes the connection and never answers.
    wait_for_line(embed, "stage embed started; connecting to RabbitMQ")
    assert stop(embed) == 0
    assert "stage embed stopped while connecting to RabbitMQ" in embed.log.read_text(), tail(embed)


def test_a_stage_stopped_while_consuming_exits_cleanly(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    embed = start_embed(tmp_path, broker.amqp_url)
    queue = routing.stage_queue(embed.namespace, "embed")
    deadline = time.monotonic() + 120
    while queue_consumers(broker, queue) < 1:
        assert embed.process.poll() is None, tail(embed)
        assert time.monotonic() < deadline, f"embed never consumed {queue}:\n{tail(embed)}"
        time.sleep(0.25)
    assert stop(embed) == 0
    assert "stage embed stopped" in embed.log.read_text(), tail(embed)


def test_sluice_up_gives_a_stage_longer_than_its_drain() -> None:
    grace_s = inspect.signature(run_supervisor).parameters["stop_timeout_s"].default
    drain_s = inspect.signature(StageRunner.run).parameters["drain_timeout_s"].default
    assert grace_s > drain_s, f"`sluice up` kills after {grace_s}s; a stage drains {drain_s}s"
    assert grace_s > STOP_GRACE_S
