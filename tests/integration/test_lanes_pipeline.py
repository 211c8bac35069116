"""Lanes end to end on the real pipeline: with a bulk backlog already inside every stage's bulk
queue (admission opened wide, so the stages themselves must choose), interactive uploads
overtake it, and the backlog keeps moving while they keep coming."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from pipeline import Pipeline, launch, stop_pipeline, wait_for_job

BACKLOG = 30
INTERACTIVE = 3
# A bulk document is several chunks of work for embed; an interactive one is one chunk.
BULK_SECTIONS = 6
DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def wide_open(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline that admits every bulk job at once, so the backlog waits in the broker and
    the stages themselves must choose. Model calls are kept small (64 texts, in slices of 32)
    so a bulk document is seen to finish every few seconds on a slow machine too."""
    settings = {
        "SLUICE_BULK_IN_FLIGHT": str(BACKLOG * 2),
        "SLUICE_EMBED_CALL_CHUNKS": "64",
        "SLUICE_EMBED_SLICE_CHUNKS": "32",
    }
    running = launch(broker, tmp_path_factory.mktemp("lanes"), settings)
    try:
        yield running
    finally:
        stop_pipeline(running)


def note(collection: str, n: int, sections: int) -> bytes:
    """A document of its own: `sections` sections of about 200 words each."""
    words = [f"heron{n}x{i % 97}" for i in range(200)]
    return make_markdown(
        f"{collection} {n}",
        {f"Part {s}": f"Part {s} of note {n}: " + " ".join(words) for s in range(sections)},
    )


async def upload(api: httpx.AsyncClient, collection: str, n: int, priority: str) -> str:
    """Upload one document; returns its job id."""
    data = note(collection, n, BULK_SECTIONS if priority == "bulk" else 1)
    answer = await api.post(
        "/v1/documents",
        files={"file": (f"{collection}-{n}.md", data)},
        data={"collection": collection, "priority": priority},
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


def indexed_at(job: dict[str, Any]) -> datetime:
    """When the index finished the job (the gateway's clock)."""
    assert job["status"] == "indexed", job
    return datetime.fromisoformat(job["stages"]["index"]["finished_at"])


async def test_interactive_uploads_overtake_a_bulk_backlog_that_keeps_moving(
    wide_open: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=wide_open.url, timeout=60) as api:
        await asyncio.gather(*(upload(api, "imports", n, "bulk") for n in range(BACKLOG)))
        # One after another, each once the one before is in: interactive work keeps arriving.
        interactive: list[dict[str, Any]] = []
        for n in range(INTERACTIVE):
            job_id = await upload(api, "people", n, "interactive")
            interactive.append(await wait_for_job(api, job_id, DEADLINE_S))
        listed = await api.get("/v1/jobs", params={"collection": "imports", "limit": BACKLOG})
        bulk = listed.json()["jobs"]

    assert len(bulk) == BACKLOG and {job["priority"] for job in bulk} == {"bulk"}
    assert all(job["priority"] == "interactive" for job in interactive)
    bulk_ends = sorted(indexed_at(job) for job in bulk if job["status"] == "indexed")
    # Order of completion: the first interactive upload was indexed while much of the
    # backlog, queued before it, was still in flight (one FIFO puts it after all of it).
    first_done = indexed_at(interactive[0])
    still_in_flight = BACKLOG - sum(end <= first_done for end in bulk_ends)
    assert still_in_flight >= BACKLOG // 2, (still_in_flight, bulk_ends, first_done)
    # And bulk was never starved: it went on finishing documents while interactive uploads
    # kept coming.
    began = min(datetime.fromisoformat(job["created_at"]) for job in interactive)
    last_done = max(indexed_at(job) for job in interactive)
    assert any(began <= end <= last_done for end in bulk_ends), (bulk_ends, began, last_done)
