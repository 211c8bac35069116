"""Peak resident memory of processes (sampled with psutil) and queue depths from RabbitMQ."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import psutil  # type: ignore[import-untyped, import-not-found, unused-ignore]
from broker import BrokerHandle
from pipeline import credentials

MB = 1024 * 1024


@dataclass
class Peak:
    """The highest RSS seen of one process alone, and of it with its children (parse workers)."""

    own_mb: float = 0.0
    tree_mb: float = 0.0


@dataclass
class RssSampler:
    """Samples the RSS of named processes every `interval_s` in a thread until stopped."""

    pids: dict[str, int]
    interval_s: float = 0.25
    peaks: dict[str, Peak] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        """Begin sampling."""
        self.peaks = {name: Peak() for name in self.pids}
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Peak]:
        """Stop sampling and return the peaks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.peaks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample of every process (a process that is gone is skipped)."""
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                own = process.memory_info().rss
                tree = own
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree += child.memory_info().rss
                peak = self.peaks[name]
                peak.own_mb = max(peak.own_mb, own / MB)
                peak.tree_mb = max(peak.tree_mb, tree / MB)
        self.samples += 1


def queue_info(broker: BrokerHandle, queue: str) -> dict[str, Any]:
    """What the management API says of one queue (its counts a few seconds behind)."""
    user, password = credentials(broker.amqp_url)
    answer = httpx.get(
        f"{broker.management_url}/api/queues/%2F/{quote(queue, safe='')}",
        auth=(user, password),
        timeout=10,
    )
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body


def queue_depth(broker: BrokerHandle, queue: str) -> dict[str, int]:
    """Ready and unacknowledged messages of a queue, from the management API."""
    body = queue_info(broker, queue)
    return {
        "ready": int(body.get("messages_ready", 0)),
        "unacked": int(body.get("messages_unacknowledged", 0)),
    }
