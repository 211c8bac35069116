"""A new version of a document (PUT) that succeeds: searched while it is half indexed, only the
old version is found (the new one's batches are pending until its last is in), and the
document is always found, never neither; once it is indexed, only the new version's chunks
are left.

The index stage runs behind a gate (tests/fakes/gated_stage.py): the new version's first batch
is written at once, the others wait until the test has searched the half-replaced document.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from documents import make_markdown
from fakes.gated_stage import FROM_BATCH_ENV, GATE_ENV, held_marker
from invariants import assert_nothing_lost
from pipeline import wait_for_job

from contracts.messages import chunk_id
from faults.conftest import PipelineFactory, upload
from stages.backends.factory import open_index

FAKES = Path(__file__).parents[1] / "fakes"
OLD = "Old version, section {n}: the copper mines of Cornwall and their beam engines."
NEW = "New version, section {n}: the tin mines of Bolivia and the railways they built."


def version(text: str) -> bytes:
    """A document of eight sections, each its own chunk."""
    return make_markdown("Mines", {f"Part {n}": text.format(n=n) for n in range(8)})


def ids_of(job: dict[str, Any]) -> set[str]:
    """The ids of every chunk of a job's version (made from the document and its bytes)."""
    total = job["progress"]["chunks_total"] or 0
    return {chunk_id(job["document_id"], job["blob_sha256"], i) for i in range(total)}


async def search(api: httpx.AsyncClient, collection: str) -> list[dict[str, Any]]:
    """Every chunk the collection's search returns for a query about the document."""
    answer = await api.get(
        "/v1/search", params={"q": "mines and mining", "collection": collection, "k": 50}
    )
    assert answer.status_code == 200, answer.text
    hits: list[dict[str, Any]] = answer.json()["results"]
    return hits


async def test_a_replacement_is_found_all_along_and_leaves_only_the_new_version(
    pipelines: PipelineFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    pipeline = pipelines(
        commands={"index": [sys.executable, str(FAKES / "gated_stage.py"), "index"]},
        # Small chunks, one a message: each version is several batches.
        SLUICE_CHUNK_MAX_TOKENS="24",
        SLUICE_CHUNK_OVERLAP_TOKENS="0",
        SLUICE_CHUNKS_PER_MESSAGE="1",
        **{GATE_ENV: str(gate), FROM_BATCH_ENV: "1"},
    )
    index = open_index(pipeline.settings())
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        first = (await upload(api, "mines.md", version(OLD), "versions")).json()
        document = first["document_id"]
        old = await wait_for_job(api, first["job_id"])
        assert old["status"] == "indexed", old
        assert old["progress"]["chunks_total"] >= 4, old

        gate.unlink()
        second = await api.put(
            f"/v1/documents/{document}", files={"file": ("mines.md", version(NEW))}
        )
        assert second.status_code == 202, second.text
        job_id = second.json()["job_id"]
        # Mid-flight: the new version's first batch is in the index, the others wait.
        deadline = time.monotonic() + 120
        while not (held_marker(gate).exists() and index.batches_done("versions", document, job_id)):
            assert time.monotonic() < deadline, (
                f"the new version never got half in\n{pipeline.logs()}"
            )
            await asyncio.sleep(0.05)
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "indexing", job
        half = {hit["chunk_id"] for hit in await search(api, "versions")}
        # The new version's first batch is stored, but only the old version is found until
        # the new one is whole: a search never mixes a version that may yet fail.
        assert set(index.chunk_ids("versions", document)) & ids_of(job), half
        assert half == ids_of(old), half

        gate.touch()
        # Searched all along the rest of the way: never a moment without the document.
        while (job := (await api.get(f"/v1/jobs/{job_id}")).json())["status"] == "indexing":
            hits = await search(api, "versions")
            assert {hit["document_id"] for hit in hits} == {document}, (job, hits)
        new = await wait_for_job(api, job_id)
        assert new["status"] == "indexed", new

        # No mix: exactly the new version's chunks are left, and only they are found.
        assert set(index.chunk_ids("versions", document)) == ids_of(new)
        assert {hit["chunk_id"] for hit in await search(api, "versions")} == ids_of(new)
        texts = [hit["text"] for hit in await search(api, "versions")]
        assert not [t for t in texts if "Old version" in t], texts
        await assert_nothing_lost(pipeline, api, [job_id])
