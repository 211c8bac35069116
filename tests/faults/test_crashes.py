"""Workers die mid-message: `kill -9` of each stage, and a message that kills its worker."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import httpx
from documents import make_markdown
from fakes.crashing_embed import CRASH_MARKER
from invariants import assert_nothing_lost
from pipeline import wait_for_job

from faults.conftest import PipelineFactory, distinct_pdfs, upload, wait_until


async def test_kill_9_each_stage_in_turn_loses_nothing(pipelines: PipelineFactory) -> None:
    pipeline = pipelines()
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(upload(api, name, data) for name, data in distinct_pdfs(20, pages=6).items())
        )
        assert [a.status_code for a in answers] == [202] * 20
        job_ids = [a.json()["job_id"] for a in answers]

        # Each stage's status, then indexed: the pipeline's statuses less queued and failed.
        statuses = pipeline.settings().pipeline.statuses[1:-1]
        for position, stage in enumerate(pipeline.stages):
            # Kill each stage once work has reached it, while the other documents are
            # still in flight behind it.
            reached = set(statuses[position:])
            await wait_until(api, job_ids, lambda job: job["status"] in reached)  # noqa: B023
            pipeline.kill(stage)
            pipeline.start(stage)

        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        assert [job["status"] for job in jobs] == ["indexed"] * 20, jobs
        await assert_nothing_lost(pipeline, api, job_ids)


async def test_a_message_that_kills_its_worker_is_set_aside(pipelines: PipelineFactory) -> None:
    crashing_embed = [
        sys.executable,
        str(Path(__file__).parents[1] / "fakes" / "crashing_embed.py"),
    ]
    # Prefetch 1: a message prefetched beside the poison one would share its redelivery
    # count (the broker cannot tell which of the unacked messages killed the worker).
    pipeline = pipelines(
        commands={"embed": crashing_embed}, SLUICE_DELIVERY_LIMIT="3", SLUICE_EMBED_PREFETCH="1"
    )
    restarts = 0
    stop = threading.Event()

    def supervise_embed() -> None:
        # What `sluice up` does: start the stage again whenever it dies.
        nonlocal restarts
        while not stop.is_set():
            if pipeline.processes["embed"].poll() is not None:
                restarts += 1
                pipeline.start("embed")
            stop.wait(0.1)

    keeper = threading.Thread(target=supervise_embed, daemon=True)
    keeper.start()
    try:
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
            poison = await upload(
                api,
                "poison.md",
                make_markdown("Poison", {"Body": f"The sentence {CRASH_MARKER} is in here."}),
            )
            good = await asyncio.gather(
                *(
                    upload(
                        api,
                        f"good-{n}.md",
                        make_markdown(
                            f"Good {n}", {"Body": f"Healthy document number {n} about orchards."}
                        ),
                    )
                    for n in range(3)
                )
            )
            job_ids = [poison.json()["job_id"], *(g.json()["job_id"] for g in good)]
            jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
            assert jobs[0]["status"] == "failed", jobs[0]
            assert jobs[0]["error"]["code"] == "worker_crashed"
            assert jobs[0]["error"]["stage"] == "embed"
            assert [job["status"] for job in jobs[1:]] == ["indexed"] * 3
            await assert_nothing_lost(pipeline, api, job_ids)
    finally:
        stop.set()
        keeper.join()
    assert restarts >= 3, f"the worker died {restarts} times; the limit is 3"


async def test_sigterm_drains_a_busy_stage_without_losing_work(
    pipelines: PipelineFactory,
) -> None:
    pipeline = pipelines()
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(upload(api, n, d) for n, d in distinct_pdfs(8, pages=6, seed=3).items())
        )
        job_ids = [a.json()["job_id"] for a in answers]
        await wait_until(api, job_ids, lambda job: job["status"] == "embedding")
        # A stage asked to stop finishes or hands back what it holds, and exits cleanly.
        assert pipeline.terminate("embed") == 0
        pipeline.start("embed")
        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        assert [job["status"] for job in jobs] == ["indexed"] * len(job_ids), jobs
        await assert_nothing_lost(pipeline, api, job_ids)
