"""Fair admission on the real pipeline: one collection's bulk backlog waits in the job store
and is let in a couple at a time, so another collection's bulk uploads get in beside it
instead of after it; a waiting job's place in the queue comes down as the work drains."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from pipeline import Pipeline, launch, stop_pipeline, wait_for_job

BACKLOG = 36
LATE = 3
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def lanes_pipeline(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A pipeline that lets two bulk jobs into the pipeline at a time."""
    running = launch(broker, tmp_path_factory.mktemp("admission"), {"SLUICE_BULK_IN_FLIGHT": "2"})
    try:
        yield running
    finally:
        stop_pipeline(running)


def note(collection: str, n: int) -> bytes:
    """A tiny document of its own."""
    return make_markdown(f"{collection} {n}", {"Note": f"Note {n} of {collection} about kelp."})


async def upload(
    api: httpx.AsyncClient, collection: str, n: int, priority: str = "bulk"
) -> dict[str, Any]:
    """Upload one note; it must be accepted."""
    answer = await api.post(
        "/v1/documents",
        files={"file": (f"{collection}-{n}.md", note(collection, n))},
        data={"collection": collection, "priority": priority},
    )
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def job(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """The job as the API shows it now."""
    answer = await api.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_late_collection_is_admitted_before_the_backlog_ahead_of_it(
    lanes_pipeline: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=lanes_pipeline.url, timeout=60) as api:
        refused = await api.post(
            "/v1/documents",
            files={"file": ("x.md", note("x", 0))},
            data={"priority": "urgent"},
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_priority"

        backlog = await asyncio.gather(*(upload(api, "tenant-a", n) for n in range(BACKLOG)))
        late = [await upload(api, "tenant-c", n) for n in range(LATE)]
        listed = (await api.get("/v1/jobs", params={"collection": "tenant-a"})).json()["jobs"]
        waiting = sum(1 for j in listed if j["admitted_at"] is None)
        assert waiting >= 2 * LATE, f"the backlog drained before the late uploads came: {listed}"
        last = listed[0]["job_id"]  # newest first: the backlog's youngest job
        first = await job(api, last)
        assert first["priority"] == "bulk" and first["queue"]["position"] > 0, first

        # The live stream's first event carries the place too.
        async with api.stream("GET", f"/v1/jobs/{last}/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    assert isinstance(
                        json.loads(line.removeprefix("data: "))["queue"]["position"], int
                    )
                    break

        # Follow the backlog's youngest job as the work drains.
        places: list[int] = [first["queue"]["position"]]
        etas: list[float] = []
        deadline = time.monotonic() + DEADLINE_S
        while (now := await job(api, last))["status"] not in ("indexed", "failed"):
            assert time.monotonic() < deadline, f"job {last} never ended: {now}"
            if now["queue"]["position"] is not None:
                places.append(now["queue"]["position"])
            if now["queue"]["eta_s"] is not None:
                etas.append(now["queue"]["eta_s"])
            await asyncio.sleep(0.1)
        assert now["status"] == "indexed", now
        assert now["queue"] == {"position": None, "eta_s": None}
        # From behind (most of) the backlog, coming down as it drains. (How far down it is
        # seen to come depends on how fast the rest drains: a gateway keeps its snapshot of
        # the queue up to a second, so the last sample may be a second old.)
        assert places[0] >= waiting // 2, places
        assert len(set(places)) >= 2 and places[-1] < places[0], places
        assert etas and all(eta > 0 for eta in etas), etas

        ended = await asyncio.gather(
            *(wait_for_job(api, b["job_id"], DEADLINE_S) for b in [*backlog, *late])
        )
    assert [j["status"] for j in ended] == ["indexed"] * (BACKLOG + LATE), ended
    # The order of admission: every late job got in while most of the backlog still waited
    # (turns alternate between the two collections), not after all of it (one FIFO).
    order = sorted(ended, key=lambda j: j["admitted_at"])
    last_late = max(n for n, j in enumerate(order) if j["collection"] == "tenant-c")
    backlog_after = sum(1 for j in order[last_late:] if j["collection"] == "tenant-a")
    assert backlog_after >= waiting - LATE, [j["collection"] for j in order]
