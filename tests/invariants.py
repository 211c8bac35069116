"""The promise every fault test checks at its end: nothing lost, nothing stuck, nothing twice.

Every accepted job is `indexed` or `failed` with a reason a person can read; the index holds
each chunk of each indexed document exactly once, all of them searchable, and no searchable
chunk of a failed job's version (a version that failed must not be half searchable; its
batches that were written stay pending, out of search, so a retry can complete it); the
dead-letter queue holds exactly the failed jobs' messages (and any malformed messages a test
published itself).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import httpx
from pipeline import Pipeline

from contracts.messages import chunk_id
from stages.backends.factory import open_index
from stages.backends.protocols import VectorIndex
from stages.infra.broker import Broker
from stages.infra.dead_letter_queue import DeadLetter, list_dead_letters


async def dead_letters(pipeline: Pipeline) -> list[DeadLetter]:
    """What the pipeline's dead-letter queue holds, read with a client of its own."""
    broker = Broker(pipeline.settings())
    await broker.connect(wait_s=30)
    try:
        return await list_dead_letters(broker)
    finally:
        await broker.close()


async def assert_nothing_lost(
    pipeline: Pipeline,
    api: httpx.AsyncClient,
    job_ids: Iterable[str],
    *,
    unowned_dead_letters: int = 0,
) -> list[dict[str, Any]]:
    """Check the invariant for these accepted jobs; returns their final JSON."""
    jobs = [(await api.get(f"/v1/jobs/{job_id}")).json() for job_id in job_ids]
    # Whatever index the pipeline runs on: LanceDB by default, pgvector when scaled out.
    index = open_index(pipeline.settings())
    for job in jobs:
        assert job["status"] in ("indexed", "failed"), f"job ended {job['status']}: {job}"
        if job["status"] == "failed":
            assert job["error"]["message"].strip(), job
            left = chunks_left_by(index, job)
            assert not left, (
                f"{job['filename']} failed, yet these chunks of it are searchable: {left}"
            )
            continue
        ids = index.chunk_ids(job["collection"], job["document_id"])
        twice = [chunk for chunk, n in Counter(ids).items() if n > 1]
        assert not twice, f"{job['filename']}: chunks stored more than once: {twice}"
        assert len(ids) == job["progress"]["chunks_total"], (job, len(ids))
        searchable = index.chunk_ids(job["collection"], job["document_id"], searchable_only=True)
        assert sorted(searchable) == sorted(ids), f"{job['filename']}: indexed, not all searchable"
        assert job["progress"]["chunks_indexed"] == job["progress"]["chunks_total"], job

    letters = await dead_letters(pipeline)
    failed = {job["job_id"] for job in jobs if job["status"] == "failed"}
    owned = {letter.job_id for letter in letters if letter.job_id}
    assert owned == failed, f"dead letters for {owned}, failed jobs {failed}"
    assert sum(1 for letter in letters if not letter.job_id) == unowned_dead_letters
    return jobs


def chunks_left_by(index: VectorIndex, job: dict[str, Any]) -> list[str]:
    """The chunks of a job's version that a search can find (a chunk's id is made from the
    document, its bytes and the chunk's place, so a version's ids are known from its job);
    pending ones, stored for a retry but not searchable, are not among them."""
    total = job["progress"]["chunks_total"] or 0
    mine = {chunk_id(job["document_id"], job["blob_sha256"], i) for i in range(total)}
    stored = index.chunk_ids(job["collection"], job["document_id"], searchable_only=True)
    return [c for c in stored if c in mine]
