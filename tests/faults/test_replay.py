"""Replay: jobs made to fail at the index stage are listed over HTTP and by `sluice dlq list`,
then `sluice dlq replay --all` after the cause is fixed: all end indexed, each chunk once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from invariants import assert_nothing_lost
from pipeline import Pipeline, run_sluice, start_pipeline, stop_pipeline, wait_for_job

NOTES = {
    "otters.md": {
        "Tools": "Sea otters crack clams open with stones they keep in a pouch of loose skin.",
        "Kelp": "They wrap themselves in kelp fronds so the current cannot carry them off asleep.",
        "Fur": "Their fur is the densest of any animal, about a million hairs per square inch.",
    },
    "herons.md": {
        "Hunting": "Grey herons stand motionless in the shallows before striking at passing fish.",
        "Nests": "They nest together in tall trees, in colonies called heronries.",
    },
}


@pytest.fixture(scope="module")
def dlq_pipeline(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A pipeline with an operator key and a key for the `wild` collection only; small chunks
    so every note is several chunks."""
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("dlq"),
        SLUICE_API_KEYS="ops,wild-key:wild",
        SLUICE_CHUNK_MAX_TOKENS="24",
        SLUICE_CHUNK_OVERLAP_TOKENS="0",
    )
    running.env["SLUICE_API_KEY"] = "ops"
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def ops(dlq_pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client with the operator's key (every collection)."""
    headers = {"Authorization": "Bearer ops"}
    async with httpx.AsyncClient(base_url=dlq_pipeline.url, timeout=30, headers=headers) as client:
        yield client


async def upload(api: httpx.AsyncClient, name: str, collection: str) -> dict[str, Any]:
    """Upload one note and follow its job to the end."""
    answer = await api.post(
        "/v1/documents",
        files={"file": (name, make_markdown(name, NOTES[name]))},
        data={"collection": collection},
    )
    assert answer.status_code == 202, answer.text
    return await wait_for_job(api, answer.json()["job_id"])


async def test_dead_letters_are_listed_then_replayed_into_indexed_jobs(
    ops: httpx.AsyncClient, dlq_pipeline: Pipeline
) -> None:
    # A plain file where a collection's table belongs makes every index write there fail.
    index_dir = dlq_pipeline.data_dir / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    blockers = [index_dir / f"chunks_{c}.lance" for c in ("wild", "birds")]
    for blocker in blockers:
        blocker.write_text("in the way")
    otters, herons = await asyncio.gather(
        upload(ops, "otters.md", "wild"), upload(ops, "herons.md", "birds")
    )
    for job in (otters, herons):
        assert job["status"] == "failed" and job["error"]["stage"] == "index", job
        assert job["progress"]["chunks_total"] >= 2, job
    job_ids = {otters["job_id"], herons["job_id"]}

    listed = run_sluice(dlq_pipeline, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split("\t") == ["job id", "stage", "code", "reason", "attempts", "age"]
    assert {row.split("\t")[0] for row in rows} == job_ids
    assert {row.split("\t")[1] for row in rows} == {"index"}

    letters = (await ops.get("/v1/dead-letters")).json()["dead_letters"]
    assert {d["job_id"] for d in letters} == job_ids
    for letter in letters:
        assert letter["stage"] == "index" and letter["attempts"] == 2 and letter["reason"]
        assert letter["dead_at"] and letter["age_s"] >= 0
    # A key bound to `wild` sees only that collection's letters.
    wild = {"Authorization": "Bearer wild-key"}
    wild_letters = (await ops.get("/v1/dead-letters", headers=wild)).json()["dead_letters"]
    assert {d["job_id"] for d in wild_letters} == {otters["job_id"]}
    empty = await ops.post("/v1/dead-letters/replay", json={})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_request"

    for blocker in blockers:
        blocker.unlink()
    replayed = run_sluice(dlq_pipeline, "dlq", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    lines = replayed.stdout.splitlines()
    assert lines[0] == f"replayed {len(letters)} dead letters of 2 jobs", replayed.stdout
    assert {line.strip() for line in lines[1:]} == job_ids

    for job_id, (name, collection) in zip(
        (otters["job_id"], herons["job_id"]),
        (("otters.md", "wild"), ("herons.md", "birds")),
        strict=True,
    ):
        job = await wait_for_job(ops, job_id)
        assert job["status"] == "indexed", job
        assert job["progress"]["chunks_indexed"] == job["progress"]["chunks_total"], job
        # Resumed at index: the earlier stages ran once.
        assert job["stages"]["parse"]["attempts"] == 1
        for sentence in NOTES[name].values():
            params: dict[str, str | int] = {"q": sentence, "collection": collection, "k": 20}
            results = (await ops.get("/v1/search", params=params)).json()["results"]
            chunk_ids = [hit["chunk_id"] for hit in results]
            assert len(chunk_ids) == len(set(chunk_ids)) == job["progress"]["chunks_total"]
            assert any(sentence in hit["text"] for hit in results)

    assert (await ops.get("/v1/dead-letters")).json() == {"dead_letters": []}
    assert run_sluice(dlq_pipeline, "dlq", "list").stdout.strip() == "no dead letters"
    await assert_nothing_lost(dlq_pipeline, ops, [otters["job_id"], herons["job_id"]])
