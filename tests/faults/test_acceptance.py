"""Crash-safe acceptance: a gateway that dies between recording a job and the broker's
confirm of its first message leaves nothing stuck.

The window is hit deterministically with a fault point only tests can arm
(gateway/http/faults.py: the gateway kills itself with SIGKILL right after the job is
recorded, before the publish), on both job stores; and the way it happens in production
too: a gateway killed while the broker's memory alarm holds its publish.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import BrokerHandle, PrivateBroker
from invariants import assert_nothing_lost
from pipeline import Pipeline, launch, stop_pipeline, wait_for_job
from postgres import PostgresHandle

from faults.conftest import distinct_pdfs

ARMED = {"SLUICE_TEST_FAULTS": "1", "SLUICE_TEST_FAULT": "after_job_recorded"}


def _start(
    broker: BrokerHandle, root: Path, store: str, request: pytest.FixtureRequest, **settings: str
) -> Pipeline:
    """A pipeline on the job store named by `store`, its gateway armed to die after recording."""
    if store == "postgres":
        postgres: PostgresHandle = request.getfixturevalue("postgres")
        settings["SLUICE_JOB_STORE_URL"] = postgres.database("accept")
    pipeline = launch(broker, root, settings, process_env={"gateway": dict(ARMED)})
    return pipeline


def _restart_gateway_disarmed(pipeline: Pipeline) -> None:
    pipeline.process_env["gateway"] = {}
    pipeline.start("gateway")


async def _wait_ready(api: httpx.AsyncClient, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if (await api.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise AssertionError("the gateway did not come back")


async def _jobs_of(api: httpx.AsyncClient, collection: str) -> list[dict[str, Any]]:
    answer = await api.get("/v1/jobs", params={"collection": collection})
    jobs: list[dict[str, Any]] = answer.json()["jobs"]
    return jobs


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_job_recorded_but_never_published_is_published_again(
    broker: BrokerHandle, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    pipeline = _start(broker, tmp_path, store, request, SLUICE_REPUBLISH_AFTER_S="1")
    try:
        ((name, data),) = distinct_pdfs(1, pages=2, seed=21).items()
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as api:
            with pytest.raises(httpx.HTTPError):
                # The gateway dies inside the request: the client never hears back.
                await api.post(
                    "/v1/documents", files={"file": (name, data)}, data={"collection": "c"}
                )
            assert pipeline.processes["gateway"].wait(timeout=30) == -9
            _restart_gateway_disarmed(pipeline)
            await _wait_ready(api)
            (recorded,) = await _jobs_of(api, "c")
            # Nobody retried: the restarted gateway's republisher found the job and sent it.
            job = await wait_for_job(api, recorded["job_id"])
            assert job["status"] == "indexed", (job, pipeline.logs())
            await assert_nothing_lost(pipeline, api, [job["job_id"]])
            assert "published again" in (pipeline.log_dir / "gateway.log").read_text()
    finally:
        stop_pipeline(pipeline)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_client_retry_revives_the_dead_job(
    broker: BrokerHandle, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    # The republisher waits long here, so only the client's retry can bring the job back.
    pipeline = _start(broker, tmp_path, store, request, SLUICE_REPUBLISH_AFTER_S="3600")
    try:
        ((name, data),) = distinct_pdfs(1, pages=2, seed=22).items()
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as api:
            with pytest.raises(httpx.HTTPError):
                await api.post(
                    "/v1/documents", files={"file": (name, data)}, data={"collection": "c"}
                )
            pipeline.processes["gateway"].wait(timeout=30)
            _restart_gateway_disarmed(pipeline)
            await _wait_ready(api)
            (recorded,) = await _jobs_of(api, "c")
            again = await api.post(
                "/v1/documents", files={"file": (name, data)}, data={"collection": "c"}
            )
            assert again.status_code == 200, again.text
            assert again.json()["duplicate"] is True
            assert again.json()["job_id"] == recorded["job_id"]
            job = await wait_for_job(api, recorded["job_id"])
            assert job["status"] == "indexed", (job, pipeline.logs())
    finally:
        stop_pipeline(pipeline)


async def test_a_gateway_killed_while_the_memory_alarm_holds_its_publish(
    own_broker: PrivateBroker, tmp_path: Path
) -> None:
    pipeline = launch(own_broker, tmp_path, {"SLUICE_REPUBLISH_AFTER_S": "1"})
    try:
        files = distinct_pdfs(3, pages=2, seed=23)
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
            # Every publish now waits: RabbitMQ blocks publishers while its memory alarm is on.
            own_broker.rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
            uploads = [
                asyncio.create_task(
                    api.post("/v1/documents", files={"file": (n, d)}, data={"collection": "m"})
                )
                for n, d in files.items()
            ]
            deadline = time.monotonic() + 30
            while len(await _jobs_of(api, "m")) < len(files):
                assert time.monotonic() < deadline, "the uploads were never recorded"
                await asyncio.sleep(0.1)
            pipeline.kill("gateway")  # recorded, publish held by the alarm: the window
            for task in uploads:
                with pytest.raises(httpx.HTTPError):
                    await task
            own_broker.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            pipeline.start("gateway")
            await _wait_ready(api)
            recorded = [job["job_id"] for job in await _jobs_of(api, "m")]
            assert len(recorded) == len(files)
            jobs = await asyncio.gather(*(wait_for_job(api, j) for j in recorded))
            assert [job["status"] for job in jobs] == ["indexed"] * len(files), pipeline.logs()
            await assert_nothing_lost(pipeline, api, recorded)
    finally:
        own_broker.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
        stop_pipeline(pipeline)
