"""A stage module from outside Sluice, plugged in by settings alone, in the real pipeline.

The test writes the module into a temporary directory (not the repository), names it in
`SLUICE_STAGE_MODULES` and `SLUICE_STAGES`, and runs it between chunk and embed on a real
broker with the real model. The stage changes the number of chunks: it drops every other
chunk, drops a whole batch, and adds a chunk of its own to the others. The document must
still end `indexed`, with exactly the chunks the stage emitted in the index, and a
replacement (PUT) must still remove the old version.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from broker import BrokerHandle
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from stages.backends.lance_index import LanceIndex

# The stage a team would write: one module, a declaration and a pure handler.
PLUGIN = '''
"""Reshape: drops every other chunk and batch 1, adds one chunk of its own to each batch."""

import json
import os

from contracts.messages import Chunk, ChunkBatch
from contracts.pipeline import StageSpec
from contracts.settings import Settings
from stages.stage import Stage


async def startup(settings: Settings) -> str:
    return os.environ["RESHAPE_LOG"]


async def handle(msg: ChunkBatch, log: str) -> list[ChunkBatch]:
    kept = [] if msg.batch_index == 1 else [c for c in msg.chunks if c.chunk_index % 2 == 0]
    if msg.batch_index != 1:
        kept.append(
            Chunk(
                chunk_id=f"added-{msg.job_id}-{msg.batch_index}",
                chunk_index=10_000 + msg.batch_index,
                text=f"Reshape note {msg.batch_index}: the ferry to Skye leaves at dawn.",
            )
        )
    with open(log, "a") as out:
        out.write(json.dumps({"job_id": msg.job_id, "ids": [c.chunk_id for c in kept]}) + "\\n")
    return [msg.model_copy(update={"chunks": kept})]


STAGE = Stage(
    spec=StageSpec("reshape", ChunkBatch, ChunkBatch, status="reshaping"),
    startup=startup,
    handle=handle,
)
'''

PARAGRAPH = (
    "Section {n}. Terns cross the Atlantic twice a year, following the winds along the coast "
    "of Africa and resting on floating weed; each paragraph says so in its own words, number {n}."
)


def _document(seed: str, paragraphs: int = 24) -> bytes:
    return "\n\n".join(PARAGRAPH.format(n=f"{seed}-{i}") for i in range(paragraphs)).encode()


@pytest.fixture(scope="module")
def plugged(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline running parse, chunk, the outside `reshape` stage, embed and index."""
    outside = tmp_path_factory.mktemp("outside")
    package = outside / "teamstages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "reshape.py").write_text(textwrap.dedent(PLUGIN))
    # The test reads the pipeline's settings too, so it must find the module as they do.
    sys.path.insert(0, str(outside))

    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("plugged"),
        SLUICE_STAGE_MODULES="reshape=teamstages.reshape",
        SLUICE_STAGES="parse,chunk,reshape,embed,index",
        SLUICE_CHUNKS_PER_MESSAGE="4",
        SLUICE_CHUNK_MAX_TOKENS="48",
        SLUICE_CHUNK_OVERLAP_TOKENS="0",
        RESHAPE_LOG=str(outside / "emitted.jsonl"),
        PYTHONPATH=os.pathsep.join(p for p in (str(outside), os.environ.get("PYTHONPATH")) if p),
    )
    try:
        yield running
    finally:
        stop_pipeline(running)
        sys.path.remove(str(outside))


@pytest.fixture
async def api(plugged: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the plugged pipeline's gateway."""
    async with httpx.AsyncClient(base_url=plugged.url, timeout=30) as client:
        yield client


def _emitted(pipeline: Pipeline, job_id: str) -> set[str]:
    """Every chunk id the outside stage emitted for a job (redeliveries log twice: a set)."""
    log = Path(pipeline.env["RESHAPE_LOG"])
    ids: set[str] = set()
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["job_id"] == job_id:
            ids.update(entry["ids"])
    return ids


def _indexed(pipeline: Pipeline, collection: str, document_id: str) -> list[str]:
    return LanceIndex(pipeline.settings().index_dir).chunk_ids(collection, document_id)


async def test_an_outside_stage_reshapes_chunks_and_the_document_still_completes(
    api: httpx.AsyncClient, plugged: Pipeline
) -> None:
    answer = await api.post(
        "/v1/documents", files={"file": ("terns.txt", _document("a"))}, data={"collection": "p"}
    )
    assert answer.status_code == 202, answer.text
    job = await wait_for_job(api, answer.json()["job_id"])
    assert job["status"] == "indexed", (job, plugged.logs())
    assert "reshape" in job["stages"], job["stages"]
    emitted = _emitted(plugged, job["job_id"])
    indexed = _indexed(plugged, "p", job["document_id"])
    # Batch 1 was dropped whole and the others lost chunks: the index holds exactly what
    # the stage emitted, each chunk once, and the job counts what was really indexed.
    assert len(indexed) == len(set(indexed)), indexed
    assert set(indexed) == emitted
    assert job["progress"]["chunks_indexed"] == job["progress"]["chunks_total"] == len(emitted)
    found = await api.get("/v1/search", params={"q": "ferry to Skye at dawn", "collection": "p"})
    assert found.json()["results"][0]["chunk_id"].startswith("added-"), found.json()

    # A new version through the same stage: once indexed, only its chunks remain.
    replaced = await api.put(
        f"/v1/documents/{job['document_id']}", files={"file": ("terns.txt", _document("b"))}
    )
    assert replaced.status_code == 202, replaced.text
    newer = await wait_for_job(api, replaced.json()["job_id"])
    assert newer["status"] == "indexed", (newer, plugged.logs())
    assert set(_indexed(plugged, "p", job["document_id"])) == _emitted(plugged, newer["job_id"])
    assert not emitted & set(_indexed(plugged, "p", job["document_id"]))


async def test_the_outside_stage_shows_in_status_and_topology(
    api: httpx.AsyncClient, plugged: Pipeline
) -> None:
    answer = await api.get("/v1/jobs", params={"status": "reshaping"})
    # A status of the outside stage is a status the API knows (400 for one it does not).
    assert answer.status_code == 200, answer.text
    assert (await api.get("/v1/jobs", params={"status": "gardening"})).status_code == 400
    settings = plugged.settings()
    assert settings.pipeline.names == ("parse", "chunk", "reshape", "embed", "index")
    assert settings.pipeline.output_key("chunk") == "doc.reshape"
