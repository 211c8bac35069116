"""Re-indexing a collection on a real broker with the real model, while it keeps answering:
search never misses during it, the switch changes the chunk count to the new settings, an
upload made meanwhile is found after it, a cancel changes nothing, and a stage killed with
`kill -9` half way still ends in a complete switch. On LanceDB, and once on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from pipeline import Pipeline, run_sluice, start_pipeline, stop_pipeline, wait_for_job
from postgres import PostgresHandle

from contracts.generations import index_name
from stages.backends.factory import open_index

# One subject per document: a sentence only it holds, in prose of its own vocabulary, long
# enough to make several 256-token chunks and more 128-token ones.
SUBJECTS = {
    "lighthouse": "The keeper trimmed the lamp wick before the storm reached the rocky point.",
    "sourdough": "The starter doubled overnight and the loaf rose with an open crumb.",
    "glacier": "Meltwater carved a blue tunnel beneath the advancing tongue of ice.",
    "violin": "The luthier varnished the spruce top and fitted a new maple bridge.",
    "beehive": "The queen laid eggs in the comb while workers fanned the nectar dry.",
}
_VOCABULARY = {
    "lighthouse": "keeper lamp lens beacon tower coast rocks fog signal tide harbour ship",
    "sourdough": "flour starter dough loaf crust oven knead yeast crumb proof bake rye",
    "glacier": "ice moraine crevasse melt snow valley cirque firn calving slope cold",
    "violin": "bow string bridge scroll varnish spruce maple luthier tune rosin neck",
    "beehive": "honey comb queen worker drone nectar pollen wax brood swarm frame",
}
DEADLINE_S = 240.0


def document(subject: str, seed: int = 0) -> bytes:
    """A Markdown document about one subject, ~700 words, its own sentence in the middle."""
    rng = random.Random(f"{subject}-{seed}")
    words = _VOCABULARY[subject].split()
    paragraphs = [
        ". ".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(10)) + "."
        for _ in range(6)
    ]
    paragraphs.insert(3, SUBJECTS[subject])
    sections = {f"Part {n}": text for n, text in enumerate(paragraphs, start=1)}
    return make_markdown(subject.title(), sections)


@pytest.fixture(scope="module")
def lance(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline on the embedded stores (SQLite, LanceDB) for this module."""
    running = start_pipeline(broker, tmp_path_factory.mktemp("reindex"))
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(lance: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's gateway."""
    async with httpx.AsyncClient(base_url=lance.url, timeout=30) as client:
        yield client


async def ingest(api: httpx.AsyncClient, collection: str, subjects: list[str]) -> dict[str, str]:
    """Upload one document per subject and wait until each is indexed; filename → job id."""
    answers = await asyncio.gather(
        *(
            api.post(
                "/v1/documents",
                files={"file": (f"{s}.md", document(s))},
                data={"collection": collection},
            )
            for s in subjects
        )
    )
    for answer in answers:
        assert answer.status_code == 202, answer.text
    jobs = await asyncio.gather(*(wait_for_job(api, a.json()["job_id"]) for a in answers))
    assert [j["status"] for j in jobs] == ["indexed"] * len(subjects), jobs
    return {j["filename"]: j["job_id"] for j in jobs}


async def collection(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """GET /v1/collections/{name}."""
    answer = await api.get(f"/v1/collections/{name}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def wait_for_reindex(
    api: httpx.AsyncClient, name: str, reindex_id: str, states: set[str]
) -> dict[str, Any]:
    """The collection once its reindex is in one of `states` (on its status, with a deadline)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = await collection(api, name)
        reindex = found["reindex"]
        assert reindex is not None and reindex["reindex_id"] == reindex_id, found
        if reindex["status"] in states:
            return found
        assert reindex["status"] in {"running", "switching"}, found
        await asyncio.sleep(0.2)
    raise AssertionError(f"reindex {reindex_id} of {name} not {states} in {DEADLINE_S}s")


async def top_file(api: httpx.AsyncClient, name: str, subject: str) -> dict[str, Any]:
    """The best hit for a subject's own sentence."""
    answer = await api.get("/v1/search", params={"q": SUBJECTS[subject], "collection": name})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert results, f"no hit for {subject} in {name}"
    hit: dict[str, Any] = results[0]
    return hit


async def start(api: httpx.AsyncClient, name: str, **settings: Any) -> dict[str, Any]:
    """POST a reindex; its 202 body."""
    answer = await api.post(f"/v1/collections/{name}/reindex", json=settings)
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def reindex_jobs(api: httpx.AsyncClient, name: str, reindex_id: str) -> list[dict[str, Any]]:
    """The jobs a reindex ran (GET /v1/jobs lists them beside the uploads)."""
    answer = await api.get("/v1/jobs", params={"collection": name, "limit": 200})
    assert answer.status_code == 200, answer.text
    return [j for j in answer.json()["jobs"] if j["reindex_id"] == reindex_id]


def chunks_in(pipeline: Pipeline, name: str, generation: int) -> int:
    """The chunks one generation of a collection holds in the index, read directly."""
    return open_index(pipeline.settings()).chunk_count(index_name(name, generation))


async def dropped(pipeline: Pipeline, name: str, generation: int) -> None:
    """Wait (with a deadline) until a generation holds no chunk: the monitor dropped it."""
    deadline = time.monotonic() + DEADLINE_S
    while chunks_in(pipeline, name, generation):
        assert time.monotonic() < deadline, f"{index_name(name, generation)} was never dropped"
        await asyncio.sleep(0.2)


async def searched_right_throughout(
    api: httpx.AsyncClient, name: str, subjects: list[str], until: asyncio.Event
) -> int:
    """Search every subject again and again until `until` is set; every top hit must be its
    file. Returns how many searches there were."""
    searches = 0
    while not until.is_set() or searches < len(subjects):
        subject = subjects[searches % len(subjects)]
        hit = await top_file(api, name, subject)
        assert hit["filename"] == f"{subject}.md", (searches, subject, hit)
        searches += 1
    return searches


async def reindex_while_searching(
    api: httpx.AsyncClient, pipeline: Pipeline, name: str, subjects: list[str]
) -> None:
    """Scenario 1: re-index with 128-token chunks while a client keeps searching."""
    await ingest(api, name, subjects)
    before = await collection(api, name)
    assert (before["generation"]["number"], before["generation"]["chunk_max_tokens"]) == (0, 256)
    assert before["chunks"] == chunks_in(pipeline, name, 0) > 0

    done = asyncio.Event()
    searcher = asyncio.create_task(searched_right_throughout(api, name, subjects, done))
    started = await start(api, name, chunk_max_tokens=128, chunk_overlap_tokens=16)
    assert (started["generation"], started["documents_total"]) == (1, len(subjects))
    after = await wait_for_reindex(api, name, started["reindex_id"], {"done", "failed"})
    done.set()
    # Every subject was searched at least once, and every search found its file.
    assert await searcher >= len(subjects)

    assert after["reindex"]["status"] == "done", after
    assert after["reindex"]["documents_done"] == len(subjects)
    assert after["generation"]["number"] == 1
    assert after["generation"]["chunk_max_tokens"] == 128
    assert after["generation"]["chunk_overlap_tokens"] == 16
    # More, smaller chunks: what the collection counts is what the new generation holds,
    # the sum of its jobs' chunks, and the old generation is gone from the index.
    jobs = await reindex_jobs(api, name, started["reindex_id"])
    assert sorted(j["filename"] for j in jobs) == sorted(f"{s}.md" for s in subjects)
    assert {(j["status"], j["generation"]) for j in jobs} == {("indexed", 1)}
    assert after["chunks"] == sum(j["progress"]["chunks_total"] for j in jobs)
    assert after["chunks"] == chunks_in(pipeline, name, 1) > before["chunks"]
    await dropped(pipeline, name, 0)
    for subject in subjects:
        hit = await top_file(api, name, subject)
        assert hit["filename"] == f"{subject}.md"
        assert SUBJECTS[subject] in hit["text"]
        # Chunks of the new size: a word is at least one of the model's tokens.
        answer = await api.get("/v1/search", params={"q": subject, "collection": name, "k": 20})
        assert all(len(h["text"].split()) <= 128 for h in answer.json()["results"])
    # The upload jobs are still the documents' versions, counted once.
    assert after["documents"] == len(subjects)


async def test_search_finds_the_right_file_throughout_and_the_switch_rechunks(
    api: httpx.AsyncClient, lance: Pipeline
) -> None:
    await reindex_while_searching(api, lance, "atlas", ["lighthouse", "sourdough", "glacier"])


async def test_an_upload_during_the_reindex_is_found_after_the_switch(
    api: httpx.AsyncClient, lance: Pipeline
) -> None:
    await ingest(api, "bay", ["lighthouse", "sourdough", "glacier"])
    # The command line starts it and follows it to the end (exit 0 once done).
    follow = asyncio.create_task(
        asyncio.to_thread(run_sluice, lance, "reindex", "bay", "--chunk-max-tokens", "128")
    )
    deadline = time.monotonic() + DEADLINE_S
    while (await collection(api, "bay"))["reindex"] is None:
        assert time.monotonic() < deadline, "the CLI never started the reindex"
        await asyncio.sleep(0.1)
    late = await api.post(
        "/v1/documents",
        files={"file": ("violin.md", document("violin"))},
        data={"collection": "bay"},
    )
    assert late.status_code == 202, late.text
    assert (await wait_for_job(api, late.json()["job_id"]))["status"] == "indexed"
    finished = await follow
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "done" in finished.stdout

    after = await collection(api, "bay")
    assert (after["generation"]["number"], after["reindex"]["status"]) == (1, "done")
    assert after["documents"] == 4
    hit = await top_file(api, "bay", "violin")
    assert hit["filename"] == "violin.md"
    assert after["chunks"] == chunks_in(lance, "bay", 1)


async def test_a_cancelled_reindex_leaves_search_as_it_was(
    api: httpx.AsyncClient, lance: Pipeline
) -> None:
    subjects = ["glacier", "violin", "beehive"]
    await ingest(api, "cove", subjects)
    before = await collection(api, "cove")
    hits = {s: await top_file(api, "cove", s) for s in subjects}

    started = await start(api, "cove", chunk_max_tokens=64, chunk_overlap_tokens=8)
    # Cancelled once its work is in the queues.
    deadline = time.monotonic() + DEADLINE_S
    while not await reindex_jobs(api, "cove", started["reindex_id"]):
        assert time.monotonic() < deadline, "the reindex never sent a document"
        await asyncio.sleep(0.05)
    cancelled = await api.delete("/v1/collections/cove/reindex")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert (await api.delete("/v1/collections/cove/reindex")).status_code == 404

    # Once what it had sent has ended, its generation is dropped, and nothing changed.
    deadline = time.monotonic() + DEADLINE_S
    while not all(
        j["status"] in {"indexed", "failed"}
        for j in await reindex_jobs(api, "cove", started["reindex_id"])
    ):
        assert time.monotonic() < deadline, "the cancelled reindex's jobs never ended"
        await asyncio.sleep(0.2)
    await dropped(lance, "cove", 1)
    after = await collection(api, "cove")
    assert (after["generation"], after["chunks"]) == (before["generation"], before["chunks"])
    assert after["reindex"]["status"] == "cancelled"
    for subject in subjects:
        assert await top_file(api, "cove", subject) == hits[subject]
    assert chunks_in(lance, "cove", 0) == before["chunks"]


async def test_kill_9_of_the_embed_stage_mid_reindex_still_switches(
    api: httpx.AsyncClient, lance: Pipeline
) -> None:
    subjects = list(SUBJECTS)
    await ingest(api, "delta", subjects)
    started = await start(api, "delta", chunk_max_tokens=64, chunk_overlap_tokens=8)
    # Kill it once the new generation's work is in the embed stage's hands.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        jobs = await reindex_jobs(api, "delta", started["reindex_id"])
        if any(j["status"] in {"embedding", "indexing"} for j in jobs):
            break
        assert time.monotonic() < deadline, jobs
        await asyncio.sleep(0.05)
    lance.kill("embed")
    assert (await collection(api, "delta"))["reindex"]["state"] in {"running", "switching"}
    lance.start("embed")

    after = await wait_for_reindex(api, "delta", started["reindex_id"], {"done", "failed"})
    assert after["reindex"]["status"] == "done", after
    assert after["reindex"]["documents_done"] == len(subjects)
    assert (after["generation"]["number"], after["generation"]["chunk_max_tokens"]) == (1, 64)
    assert after["chunks"] == chunks_in(lance, "delta", 1)
    for subject in subjects:
        assert (await top_file(api, "delta", subject))["filename"] == f"{subject}.md"


async def test_reindex_on_postgresql(
    broker: BrokerHandle, postgres: PostgresHandle, tmp_path: Path
) -> None:
    database = postgres.database("reindex")
    running = start_pipeline(
        broker, tmp_path, SLUICE_JOB_STORE_URL=database, SLUICE_INDEX_URL=database
    )
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            await reindex_while_searching(client, running, "atlas", ["violin", "beehive"])
    finally:
        stop_pipeline(running)
