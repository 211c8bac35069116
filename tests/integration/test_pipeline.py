"""The whole pipeline on a real broker with the real model: upload over HTTP, follow the job,
search what was indexed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from documents import (
    DOCX_CELL,
    DOCX_SENTENCE,
    HTML_SENTENCE,
    LATIN1_SENTENCE,
    MD_SENTENCE,
    PDF_PAGE_2,
    corpus,
    make_gif,
    make_image_only_pdf,
    make_markdown,
)
from pipeline import MAX_UPLOAD_BYTES, Pipeline, wait_for_job


async def upload(
    api: httpx.AsyncClient, name: str, data: bytes, collection: str, **headers: str
) -> httpx.Response:
    """POST one file as multipart, the way any client would."""
    return await api.post(
        "/v1/documents",
        files={"file": (name, data)},
        data={"collection": collection},
        headers=headers,
    )


async def top_hit(api: httpx.AsyncClient, query: str, collection: str) -> dict[str, Any]:
    """The best search result for a query."""
    answer = await api.get("/v1/search", params={"q": query, "collection": collection, "k": 3})
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    assert results, f"no results for {query!r}"
    return results[0]


async def test_every_type_is_indexed_and_found(api: httpx.AsyncClient) -> None:
    files = corpus()
    answers = await asyncio.gather(*(upload(api, n, d, "mixed") for n, d in files.items()))
    for answer in answers:
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["status"] == "queued"
        assert answer.headers["location"] == body["status_url"] == f"/v1/jobs/{body['job_id']}"
    jobs = await asyncio.gather(*(wait_for_job(api, a.json()["job_id"]) for a in answers))
    for job in jobs:
        assert job["status"] == "indexed", job
        assert job["progress"]["chunks_indexed"] == job["progress"]["chunks_total"] >= 1
        assert job["progress"]["chunks_embedded"] == job["progress"]["chunks_total"]
        assert set(job["stages"]) == {"parse", "chunk", "embed", "index"}
        # Quick stages send no started event; their progress event still times them.
        assert all(s["started_at"] <= s["finished_at"] for s in job["stages"].values()), job
    assert {j["filename"]: j["progress"]["pages"] for j in jobs}["report.pdf"] == 3

    expected = {
        PDF_PAGE_2: ("report.pdf", 2),
        DOCX_SENTENCE: ("audit.docx", None),
        HTML_SENTENCE: ("lighthouses.html", None),
        MD_SENTENCE: ("bread.md", None),
        LATIN1_SENTENCE: ("cafe.txt", None),
    }
    for sentence, (filename, page) in expected.items():
        hit = await top_hit(api, sentence, "mixed")
        assert (hit["filename"], hit["page"]) == (filename, page), hit
        assert sentence in hit["text"]
    table_hit = await top_hit(api, f"{DOCX_CELL} count", "mixed")
    assert table_hit["filename"] == "audit.docx" and DOCX_CELL in table_hit["text"]


async def test_same_bytes_again_is_a_duplicate(api: httpx.AsyncClient) -> None:
    data = make_markdown("Duplicates", {"Once": "This note about tidal pools is uploaded twice."})
    first = await upload(api, "note.md", data, "dupes")
    assert first.status_code == 202
    await wait_for_job(api, first.json()["job_id"])
    again = await upload(api, "note-copy.md", data, "dupes")
    assert again.status_code == 200, again.text
    assert again.json()["duplicate"] is True
    assert again.json()["job_id"] == first.json()["job_id"]
    keyed = await upload(
        api,
        "other.md",
        b"# Other\n\nDifferent bytes, same key.",
        "dupes",
        **{"Idempotency-Key": "key-1"},
    )
    assert keyed.status_code == 202
    replayed = await upload(
        api,
        "other.md",
        b"# Other\n\nDifferent bytes, same key.",
        "dupes",
        **{"Idempotency-Key": "key-1"},
    )
    assert replayed.status_code == 200 and replayed.json()["job_id"] == keyed.json()["job_id"]
    # The same bytes in another collection are new work there.
    elsewhere = await upload(api, "note.md", data, "dupes-elsewhere")
    assert elsewhere.status_code == 202


async def test_rejected_uploads_leave_no_job(api: httpx.AsyncClient) -> None:
    async def job_count() -> int:
        listed = await api.get("/v1/jobs", params={"limit": 500})
        return len(listed.json()["jobs"])

    before = await job_count()
    cases = [
        ("picture.pdf", make_gif(), "default", 415, "unsupported_media_type"),
        ("empty.txt", b"", "default", 400, "empty_file"),
        ("big.txt", b"a" * (MAX_UPLOAD_BYTES + 1), "default", 413, "file_too_large"),
        ("ok.txt", b"fine text", "Not A Collection!", 400, "invalid_collection"),
    ]
    for name, data, collection, status, code in cases:
        answer = await upload(api, name, data, collection)
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["error"]["code"] == code
        assert answer.json()["error"]["message"]
    assert await job_count() == before


async def test_unparseable_document_fails_with_a_reason(api: httpx.AsyncClient) -> None:
    answer = await upload(api, "scan.pdf", make_image_only_pdf(), "failures")
    job = await wait_for_job(api, answer.json()["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["stage"] == "parse"
    assert job["error"]["code"] == "no_text"
    assert job["error"]["retryable"] is False
    assert "OCR" in job["error"]["message"]
    listed = await api.get("/v1/jobs", params={"status": "failed", "collection": "failures"})
    assert [j["job_id"] for j in listed.json()["jobs"]] == [job["job_id"]]


async def test_retry_resumes_at_the_failed_stage_after_the_cause_is_fixed(
    api: httpx.AsyncClient, pipeline: Pipeline
) -> None:
    # A plain file where the collection's table belongs makes every index write fail.
    blocker = pipeline.data_dir / "index" / "chunks_blocked.lance"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    answer = await upload(api, "notes.md", make_markdown("Notes", {"A": MD_SENTENCE}), "blocked")
    job_id = answer.json()["job_id"]
    failed = await wait_for_job(api, job_id)
    assert failed["status"] == "failed", failed
    assert failed["error"]["stage"] == "index"
    assert failed["error"]["retryable"] is True
    assert failed["stages"]["index"]["attempts"] == 2

    blocker.unlink()
    retried = await api.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "indexing"
    job = await wait_for_job(api, job_id)
    assert job["status"] == "indexed", job
    # Resumed at index: parse, chunk and embed ran once.
    assert job["stages"]["parse"]["attempts"] == 1
    assert (await top_hit(api, MD_SENTENCE, "blocked"))["filename"] == "notes.md"
    again = await api.post(f"/v1/jobs/{job_id}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_failed"


async def test_new_version_replaces_the_old_and_delete_removes_it(
    api: httpx.AsyncClient, pipeline: Pipeline
) -> None:
    old_text = "The old version talks about copper mining in Cornwall."
    new_text = "The new version talks about tin mining in Bolivia instead."
    first = await upload(api, "mines.md", make_markdown("Mines", {"Old": old_text}), "versions")
    document_id = first.json()["document_id"]
    await wait_for_job(api, first.json()["job_id"])

    # A new version that fails leaves the old one searchable.
    broken = await api.put(
        f"/v1/documents/{document_id}", files={"file": ("mines.pdf", make_image_only_pdf())}
    )
    assert broken.status_code == 202, broken.text
    assert (await wait_for_job(api, broken.json()["job_id"]))["status"] == "failed"
    still = await api.get("/v1/search", params={"q": old_text, "collection": "versions"})
    assert old_text in still.json()["results"][0]["text"]

    second = await api.put(
        f"/v1/documents/{document_id}",
        files={"file": ("mines.md", make_markdown("Mines", {"New": new_text}))},
    )
    assert second.status_code == 202, second.text
    assert second.json()["document_id"] == document_id
    assert (await wait_for_job(api, second.json()["job_id"]))["status"] == "indexed"
    results = (
        await api.get("/v1/search", params={"q": old_text, "collection": "versions", "k": 10})
    ).json()["results"]
    assert [r["text"] for r in results if old_text in r["text"]] == []
    assert any(new_text in r["text"] for r in results)

    job = (await api.get(f"/v1/jobs/{second.json()['job_id']}")).json()
    blob_path = pipeline.data_dir / "blobs" / job["blob_sha256"][:2] / job["blob_sha256"]
    assert blob_path.is_file()
    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204
    assert not blob_path.exists()
    results = await api.get("/v1/search", params={"q": new_text, "collection": "versions"})
    assert results.json()["results"] == []
    # Deleting again answers the same; an id that never was is still not found.
    assert (await api.delete(f"/v1/documents/{document_id}")).status_code == 204
    missing = await api.delete(f"/v1/documents/{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "document_not_found"
    assert (await api.get("/v1/jobs/nope")).json()["error"]["code"] == "job_not_found"
