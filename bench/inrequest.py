"""Drive the in-request baseline: the corpus uploaded to bench/inrequest_app.py, each upload
answered only once its document is indexed."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import Document
from bench.cpu import CpuMeter
from bench.http_load import percentile, upload_all
from bench.procs import answers, child_env, free_port, spawn, stop, wait_for
from bench.throughput import Throughput


@dataclass(frozen=True)
class InRequest(Throughput):
    """Throughput (over the whole run) and answer times of the in-request baseline."""

    failed: int
    answer_ms_p50: float
    answer_ms_p99: float
    stage_s: dict[str, float]
    cpu_s: dict[str, float]


def in_request(root: Path, docs: list[Document], *, clients: int, deadline_s: float) -> InRequest:
    """Start the app in its own process, upload the corpus with `clients` clients, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "inrequest.log"
    command = [sys.executable, "-m", "bench.inrequest_app", "--port", str(port)]
    process = spawn([*command, "--data-dir", str(root / "data")], log, child_env())
    try:
        wait_for(lambda: answers(f"{url}/healthz"), 180, "the in-request app", log)
        started = time.perf_counter()
        meter = CpuMeter({"app": process.pid}).start()
        replies = asyncio.run(upload_all(url, "corpus", docs, clients, timeout_s=deadline_s))
        cpu_s = meter.stop()
        wall_s = time.perf_counter() - started
    finally:
        stop([process])
    ok = [r for r in replies if r.status == 200]
    stage_s: dict[str, float] = defaultdict(float)
    for reply in ok:
        for stage, seconds in reply.body["seconds"].items():
            stage_s[stage] += seconds
    return InRequest(
        documents=len(ok),
        chunks=sum(int(r.body["chunks"]) for r in ok),
        failed=len(replies) - len(ok),
        wall_s=wall_s,
        answer_ms_p50=percentile((r.ms for r in replies), 50),
        answer_ms_p99=percentile((r.ms for r in replies), 99),
        stage_s=dict(stage_s),
        cpu_s=cpu_s,
    )
