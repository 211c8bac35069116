"""A burst far beyond tiny queue limits: the gateway pushes back with 429, never buffers,
and every upload it accepted ends indexed."""

from __future__ import annotations

import asyncio

import httpx
from documents import make_markdown
from invariants import assert_nothing_lost
from pipeline import wait_for_job

from faults.conftest import PipelineFactory, upload


async def test_a_burst_gets_429s_and_every_202_is_indexed(pipelines: PipelineFactory) -> None:
    pipeline = pipelines(SLUICE_QUEUE_MAX_LENGTH="2")
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(
                upload(api, f"note-{n}.md", make_markdown(f"Note {n}", {"A": f"Burst note {n}."}))
                for n in range(40)
            )
        )
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {202, 429}, statuses
        refused = [answer for answer in answers if answer.status_code == 429]
        assert refused, "a burst of 40 into queues of length 2 must be pushed back"
        for answer in refused:
            assert answer.json()["error"]["code"] == "pipeline_saturated"
            assert int(answer.headers["retry-after"]) > 0
        accepted = [answer.json()["job_id"] for answer in answers if answer.status_code == 202]
        assert accepted
        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in accepted))
        assert [job["status"] for job in jobs] == ["indexed"] * len(accepted), jobs
        await assert_nothing_lost(pipeline, api, accepted)
        listed = (await api.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
        assert len(listed) == len(accepted), "a refused upload must leave no job behind"
