"""RabbitMQ goes away mid-run, shut down or `kill -9`ed: uploads in the outage get 503, and
everything accepted is indexed, including what waited in a queue while the node was down."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from broker import BrokerHandle, PrivateBroker
from documents import make_markdown
from invariants import assert_nothing_lost
from pipeline import credentials, queue_consumers, wait_for_job

from contracts import routing
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from faults.conftest import PipelineFactory, distinct_pdfs, upload, wait_for_depth, wait_until


@pytest.mark.parametrize("outage", ["shutdown", "kill -9"])
async def test_broker_outage_mid_run_loses_nothing(
    own_broker: PrivateBroker, pipelines: PipelineFactory, outage: str
) -> None:
    pipeline = pipelines(on=own_broker)
    # Index does not run through the outage: what it has not taken must be in its queue,
    # on the node's disk, when the node goes down.
    assert pipeline.terminate("index") == 0
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(upload(api, n, d) for n, d in distinct_pdfs(10, pages=6, seed=2).items())
        )
        job_ids = [a.json()["job_id"] for a in answers]
        await wait_until(api, job_ids, lambda job: job["status"] in ("embedding", "indexing"))
        index_queue = routing.stage_queue(pipeline.namespace, "index")
        await wait_for_depth(own_broker, index_queue, lambda depth: depth > 0)

        # A crash leaves the node no time to write anything down: what it confirmed must
        # already be on disk, and it must start again from that data.
        await asyncio.to_thread(own_broker.stop if outage == "shutdown" else own_broker.kill)
        assert not own_broker.running
        during = await upload(api, "during.md", make_markdown("Outage", {"A": "Sent late."}))
        assert during.status_code == 503, during.text
        assert during.json()["error"]["code"] == "broker_unavailable"
        assert int(during.headers["retry-after"]) > 0
        assert (await api.get("/readyz")).status_code == 503

        await asyncio.to_thread(own_broker.start)
        pipeline.start("index")
        # Every process reconnects by itself, and every stage consumes again.
        deadline = time.monotonic() + 90
        queues = [routing.stage_queue(pipeline.namespace, stage) for stage in STAGES]
        while not (
            (await api.get("/readyz")).status_code == 200
            and all(queue_consumers(own_broker, q) >= 1 for q in queues)
        ):
            assert time.monotonic() < deadline, "consumers did not come back after the restart"
            await asyncio.sleep(0.25)

        after = await upload(api, "after.md", make_markdown("Back", {"A": "Sent after."}))
        assert after.status_code == 202, after.text
        job_ids.append(after.json()["job_id"])
        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        assert [job["status"] for job in jobs] == ["indexed"] * len(job_ids), jobs
        await assert_nothing_lost(pipeline, api, job_ids)


async def test_a_stage_whose_queue_is_deleted_consumes_again(
    pipelines: PipelineFactory, broker: BrokerHandle
) -> None:
    """The broker cancels a consumer when its queue goes away; the stage must not go deaf."""
    pipeline = pipelines()
    queue = routing.stage_queue(pipeline.namespace, "embed")
    user, password = credentials(broker.amqp_url)
    async with httpx.AsyncClient(auth=(user, password), timeout=10) as management:
        deleted = await management.delete(f"{broker.management_url}/api/queues/%2F/{queue}")
        assert deleted.status_code == 204, deleted.text
    deadline = time.monotonic() + 60
    while queue_consumers(broker, queue) < 1:
        assert time.monotonic() < deadline, "the embed stage never consumed its queue again"
        await asyncio.sleep(0.25)
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answer = await upload(api, "after.md", make_markdown("After", {"A": "Queue is back."}))
        assert (await wait_for_job(api, answer.json()["job_id"]))["status"] == "indexed"
        await assert_nothing_lost(pipeline, api, [answer.json()["job_id"]])
