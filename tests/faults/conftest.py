"""Fixtures for fault tests: a fresh pipeline per test (own namespace, own data), and helpers
to drive it into trouble."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_pdf
from pipeline import Pipeline, launch, queue_depth, stop_pipeline

PipelineFactory = Callable[..., Pipeline]
_WORDS = [
    "harbor",
    "lantern",
    "glacier",
    "copper",
    "meadow",
    "signal",
    "orbit",
    "falcon",
    "ledger",
    "canyon",
    "thread",
    "market",
    "winter",
    "garden",
    "stone",
    "river",
    "violet",
    "anchor",
    "pepper",
    "beacon",
    "summit",
    "willow",
    "ember",
    "quartz",
]


@pytest.fixture
def pipelines(broker: BrokerHandle, tmp_path: Path) -> Iterator[PipelineFactory]:
    """Start pipelines for this test (on the suite's broker unless given one); all stop after."""
    started: list[Pipeline] = []

    def start(
        on: BrokerHandle | None = None,
        commands: dict[str, list[str]] | None = None,
        **settings: str,
    ) -> Pipeline:
        running = launch(on or broker, tmp_path / f"pipeline-{len(started)}", settings, commands)
        started.append(running)
        return running

    yield start
    for running in started:
        stop_pipeline(running)


def distinct_pdfs(count: int, pages: int, seed: int = 0) -> dict[str, bytes]:
    """`count` different PDFs of `pages` pages of prose-like text (never duplicates)."""
    documents = {}
    for n in range(count):
        rng = random.Random(seed * 1000 + n)
        text = [" ".join(rng.choice(_WORDS) for _ in range(300)) for _ in range(pages)]
        documents[f"volume-{n:02d}.pdf"] = make_pdf(text)
    return documents


async def upload(
    api: httpx.AsyncClient, name: str, data: bytes, collection: str = "default"
) -> httpx.Response:
    """POST one file."""
    return await api.post(
        "/v1/documents", files={"file": (name, data)}, data={"collection": collection}
    )


async def wait_until(
    api: httpx.AsyncClient,
    job_ids: list[str],
    test: Callable[[dict[str, Any]], bool],
    deadline_s: float = 120.0,
) -> None:
    """Wait (on job status, with a deadline) until any of the jobs satisfies `test`."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        jobs = await asyncio.gather(*(api.get(f"/v1/jobs/{job_id}") for job_id in job_ids))
        if any(test(job.json()) for job in jobs):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no job reached the awaited state in {deadline_s}s")


async def wait_for_log(
    pipeline: Pipeline, name: str, text: str, since: int, deadline_s: float = 120.0
) -> str:
    """Wait (with a deadline) until process `name` has logged a line with `text` since the mark
    `since` (`Pipeline.log_mark`); returns that line."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in pipeline.log_since(name, since).splitlines():
            if text in line:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not log {text!r} in {deadline_s}s\n{pipeline.logs()}")


async def wait_for_depth(
    broker: BrokerHandle, queue: str, test: Callable[[int], bool], deadline_s: float = 120.0
) -> None:
    """Wait (with a deadline) until the number of messages `queue` holds satisfies `test`."""
    deadline = time.monotonic() + deadline_s
    while not test(depth := await asyncio.to_thread(queue_depth, broker, queue)):
        assert time.monotonic() < deadline, f"{queue} still holds {depth} after {deadline_s}s"
        await asyncio.sleep(0.25)
