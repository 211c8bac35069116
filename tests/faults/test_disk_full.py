"""The data disk fills up, for real (a small tmpfs under the pipeline's data directory):
uploads are answered 507 `storage_full` until there is space again, and documents already
accepted wait (`retrying`, `storage_full`) however long it takes, then are all indexed once
each, nothing dead-lettered."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import httpx
from broker import BrokerHandle
from documents import make_markdown
from invariants import assert_nothing_lost
from pipeline import Pipeline, launch, stop_pipeline, wait_for_job
from small_disk import small_disk

from contracts import routing
from contracts.events import JobEvent
from faults.conftest import distinct_pdfs, upload

# launch() runs pipelines with SLUICE_MAX_ATTEMPTS=2: waiting more often than that shows a
# full disk spends no attempt.
WAITS = 3


@asynccontextmanager
async def retrying_events(pipeline: Pipeline) -> AsyncIterator[list[JobEvent]]:
    """Every `retrying` job event the stages publish while the block runs, in order."""
    heard: list[JobEvent] = []

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        heard.append(JobEvent.model_validate_json(message.body))

    connection = await aio_pika.connect(pipeline.env["SLUICE_AMQP_URL"])
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(routing.exchange(pipeline.namespace))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing.job_event_key("*", "retrying"))
        await queue.consume(on_event, no_ack=True)
        yield heard
    finally:
        await connection.close()


async def until(what: str, test: Callable[[], bool], deadline_s: float = 120.0) -> None:
    """Wait, with a deadline, until `test()` holds."""
    deadline = time.monotonic() + deadline_s
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {deadline_s}s: {what}")
        await asyncio.sleep(0.1)


def waits(heard: list[JobEvent], stage: str) -> Counter[str]:
    """How often each job waited for space in `stage`."""
    return Counter(
        e.job_id
        for e in heard
        if e.stage == stage and e.error is not None and e.error.code == "storage_full"
    )


def empty_write_ahead_log(job_store: Path) -> None:
    """Checkpoint the job store's log to nothing, so its next write needs new space (SQLite
    reuses a log's pages without asking the disk)."""
    with sqlite3.connect(job_store, timeout=30) as db:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, "the gateway held the job store; the checkpoint did not finish"


async def test_uploads_to_a_full_data_disk_are_507_until_space_returns(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "data", size_mib=32) as disk:
        pipeline = launch(broker, tmp_path, {"SLUICE_DATA_DIR": str(disk.path)})
        try:
            async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
                note = make_markdown("Terns", {"Migration": "Arctic terns fly pole to pole."})
                disk.fill()
                refused = await upload(api, "terns.md", note)
                assert refused.status_code == 507, refused.text
                assert refused.headers["Retry-After"] == "30"
                error = refused.json()["error"]
                assert error["code"] == "storage_full"
                assert "storage is full" in error["message"] and "try again" in error["message"]
                assert list((disk.path / "staging").iterdir()) == []
                assert (await api.get("/v1/jobs")).json()["jobs"] == []

                disk.free()
                accepted = await upload(api, "terns.md", note)
                assert accepted.status_code == 202, accepted.text
                job_id = accepted.json()["job_id"]
                assert (await wait_for_job(api, job_id))["status"] == "indexed"
                await assert_nothing_lost(pipeline, api, [job_id])
        finally:
            stop_pipeline(pipeline)


async def test_documents_in_flight_wait_for_space_and_are_all_indexed_once_it_returns(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    # Two disks: the data directory (job store, uploads, parsed text) and, on its own, the
    # index, so each fills and frees at its own step.
    with (
        small_disk(tmp_path / "data", size_mib=32) as data,
        small_disk(data.path / "index", size_mib=16) as index,
    ):
        pipeline = launch(
            broker,
            tmp_path,
            # Every failed write shows as a retry at once, without in-process retries first.
            {"SLUICE_DATA_DIR": str(data.path), "SLUICE_TRANSIENT_RETRIES": "0"},
        )
        try:
            async with (
                retrying_events(pipeline) as heard,
                httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api,
            ):
                # Accepted while there is space, parsed only once the disk is full.
                pipeline.terminate("parse")
                index.fill()
                answers = [
                    await upload(api, name, pdf)
                    for name, pdf in distinct_pdfs(3, pages=2, seed=13).items()
                ]
                assert [a.status_code for a in answers] == [202] * 3, [a.text for a in answers]
                job_ids = [a.json()["job_id"] for a in answers]
                empty_write_ahead_log(data.path / "jobs.sqlite3")
                data.fill()
                pipeline.start("parse")

                # Parsed text cannot be stored: every document waits, more often than it has
                # attempts, and the tracker cannot record it either.
                await until(
                    "every job waited for space in parse",
                    lambda: all(waits(heard, "parse")[j] >= WAITS for j in job_ids),
                )
                data.free()
                # Parsed, chunked, embedded; now the index is full.
                await until(
                    "every job waited for space in index",
                    lambda: all(waits(heard, "index")[j] >= WAITS for j in job_ids),
                )
                assert set(waits(heard, "chunk")) | set(waits(heard, "embed")) == set()
                index.free()

                jobs = await asyncio.gather(*(wait_for_job(api, j) for j in job_ids))
                assert [job["status"] for job in jobs] == ["indexed"] * 3, jobs
                # Waiting for space spent no attempt.
                assert [job["stages"]["parse"]["attempts"] for job in jobs] == [1] * 3
                assert [job["stages"]["index"]["attempts"] for job in jobs] == [1] * 3
                await assert_nothing_lost(pipeline, api, job_ids)
        finally:
            stop_pipeline(pipeline)
