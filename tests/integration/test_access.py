"""API keys bound to collections, against a real gateway: a key sees and touches only its
collections' documents and jobs, and another collection's job or document looks missing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from documents import make_markdown
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

RED_SENTENCE = "Red foxes cache surplus food under snow for the lean weeks of winter."


@pytest.fixture(scope="module")
def keyed(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline whose gateway knows three keys: alpha (red, blue), beta (green), root (all)."""
    running = start_pipeline(
        broker, tmp_path_factory.mktemp("keyed"), SLUICE_API_KEYS="alpha:red|blue,beta:green,root"
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def clients(keyed: Pipeline) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """One HTTP client per key, plus `none` without one."""
    opened = {
        name: httpx.AsyncClient(
            base_url=keyed.url,
            timeout=30,
            headers={"Authorization": f"Bearer {name}"} if name != "none" else {},
        )
        for name in ("alpha", "beta", "root", "none")
    }
    try:
        yield opened
    finally:
        for client in opened.values():
            await client.aclose()


async def upload(client: httpx.AsyncClient, name: str, text: str, collection: str) -> str:
    """Upload a Markdown note and wait until it is indexed or failed; returns its job id."""
    answer = await client.post(
        "/v1/documents",
        files={"file": (name, make_markdown(name, {"Note": text}))},
        data={"collection": collection},
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    await wait_for_job(client, job_id)
    return job_id


def code(answer: httpx.Response) -> tuple[int, str]:
    """Status and error code of an answer."""
    return answer.status_code, answer.json()["error"]["code"]


async def test_a_key_only_reaches_its_own_collections(
    clients: dict[str, httpx.AsyncClient], keyed: Pipeline
) -> None:
    alpha, beta, root, anonymous = (clients[k] for k in ("alpha", "beta", "root", "none"))
    red_job = await upload(alpha, "foxes.md", RED_SENTENCE, "red")
    green_job = await upload(beta, "moss.md", "Moss grows on the north side of old oaks.", "green")
    red = (await alpha.get(f"/v1/jobs/{red_job}")).json()
    assert red["status"] == "indexed" and red["stalled"] is False
    document = red["document_id"]

    # No key, or a wrong one, is turned away everywhere.
    assert code(await anonymous.get("/v1/jobs")) == (401, "unauthorized")
    wrong = httpx.AsyncClient(base_url=keyed.url, headers={"Authorization": "Bearer alphax"})
    async with wrong:
        assert code(await wrong.get(f"/v1/jobs/{red_job}")) == (401, "unauthorized")

    # beta cannot search, list, read, follow, retry, replace or delete red's things...
    search = {"q": RED_SENTENCE, "collection": "red"}
    assert code(await beta.get("/v1/search", params=search)) == (403, "collection_forbidden")
    assert code(await beta.get("/v1/jobs", params={"collection": "red"})) == (
        403,
        "collection_forbidden",
    )
    listed = (await beta.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
    assert [j["job_id"] for j in listed] == [green_job]
    for answer in (
        await beta.get(f"/v1/jobs/{red_job}"),
        await beta.get(f"/v1/jobs/{red_job}/events"),
        await beta.post(f"/v1/jobs/{red_job}/retry"),
    ):
        assert code(answer) == (404, "job_not_found")
    new_version = {"file": ("foxes.md", b"# Foxes\n\nOverwritten by someone else.")}
    assert code(await beta.put(f"/v1/documents/{document}", files=new_version)) == (
        404,
        "document_not_found",
    )
    assert code(await beta.delete(f"/v1/documents/{document}")) == (404, "document_not_found")
    into_red = await beta.post(
        "/v1/documents", files={"file": ("x.md", b"# X\n\nnot yours")}, data={"collection": "red"}
    )
    assert code(into_red) == (403, "collection_forbidden")

    # ...and alpha cannot reach green's, while root sees everything.
    assert code(await alpha.get(f"/v1/jobs/{green_job}")) == (404, "job_not_found")
    alpha_jobs = (await alpha.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
    assert [j["job_id"] for j in alpha_jobs] == [red_job]
    root_jobs = (await root.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
    assert {j["job_id"] for j in root_jobs} == {red_job, green_job}
    assert (await root.get(f"/v1/jobs/{green_job}")).status_code == 200

    hits = (await alpha.get("/v1/search", params=search)).json()["results"]
    assert hits and RED_SENTENCE in hits[0]["text"]
    assert (await root.get("/v1/search", params=search)).status_code == 200
    assert (await alpha.delete(f"/v1/documents/{document}")).status_code == 204
    assert (await alpha.get("/v1/search", params=search)).json()["results"] == []


async def test_only_a_key_of_the_collection_may_retry_its_failed_job(
    clients: dict[str, httpx.AsyncClient], keyed: Pipeline
) -> None:
    alpha, beta = clients["alpha"], clients["beta"]
    # A plain file where the collection's table belongs makes every index write fail.
    blocker = keyed.data_dir / "index" / "chunks_blue.lance"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    job_id = await upload(alpha, "tides.md", "Spring tides follow the full and new moon.", "blue")
    assert (await alpha.get(f"/v1/jobs/{job_id}")).json()["status"] == "failed"

    assert code(await beta.post(f"/v1/jobs/{job_id}/retry")) == (404, "job_not_found")
    letters = (await alpha.get("/v1/dead-letters")).json()["dead_letters"]
    assert [(d["job_id"], d["stage"], d["collection"]) for d in letters] == [
        (job_id, "index", "blue")
    ]
    assert (await beta.get("/v1/dead-letters")).json() == {"dead_letters": []}
    for selector in ({"job_id": job_id}, {"all": True}):
        answer = await beta.post("/v1/dead-letters/replay", json=selector)
        assert answer.json() == {"replayed": 0, "jobs": []}, answer.text

    blocker.unlink()
    retried = await alpha.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    assert (await wait_for_job(alpha, job_id))["status"] == "indexed"
