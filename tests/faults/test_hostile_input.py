"""Hostile input through the real pipeline: every bad file is refused at the door or fails in
parse with its own reason, and the parse stage keeps working for the next document."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from documents import (
    make_corrupt_pdf,
    make_docx_bomb,
    make_encrypted_pdf,
    make_gif,
    make_image_only_pdf,
    make_many_page_pdf,
    make_markdown,
)
from invariants import assert_nothing_lost
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from faults.conftest import upload

MAX_UPLOAD_BYTES = 128 * 1024
MAX_PDF_PAGES = 5
MAX_DOCX_UNCOMPRESSED_BYTES = 4 * 1024 * 1024
LIMITS = {
    "SLUICE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    "SLUICE_MAX_PDF_PAGES": str(MAX_PDF_PAGES),
    "SLUICE_MAX_DOCX_UNCOMPRESSED_BYTES": str(MAX_DOCX_UNCOMPRESSED_BYTES),
    # Real parsers under a tight address-space cap, two of them at once.
    "SLUICE_PARSE_MEMORY_MB": "512",
    "SLUICE_PARSE_CONCURRENCY": "2",
}


@pytest.fixture(scope="module")
def pipeline(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One pipeline with small limits for every test of this module."""
    running = start_pipeline(broker, tmp_path_factory.mktemp("hostile"), **LIMITS)
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the pipeline's gateway."""
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as client:
        yield client


async def job_count(api: httpx.AsyncClient) -> int:
    listed = await api.get("/v1/jobs", params={"limit": 500})
    return len(listed.json()["jobs"])


async def test_files_refused_at_the_door_leave_no_job(api: httpx.AsyncClient) -> None:
    before = await job_count(api)
    cases = [
        ("empty.pdf", b"", 400, "empty_file"),
        ("photo.pdf", make_gif(), 415, "unsupported_media_type"),
        ("big.txt", b"a" * (MAX_UPLOAD_BYTES + 1), 413, "file_too_large"),
    ]
    for name, data, status, code in cases:
        answer = await upload(api, name, data)
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["error"]["code"] == code, (name, answer.text)
        assert answer.json()["error"]["message"], name
    assert await job_count(api) == before


async def test_a_file_exactly_at_the_upload_limit_is_accepted(api: httpx.AsyncClient) -> None:
    text = b"Exactly at the upload limit, this note about kelp forests is still accepted."
    data = text + b" " * (MAX_UPLOAD_BYTES - len(text))
    assert len(data) == MAX_UPLOAD_BYTES
    answer = await upload(api, "at-limit.txt", data)
    assert answer.status_code == 202, answer.text
    job = await wait_for_job(api, answer.json()["job_id"])
    assert job["status"] == "indexed", job


async def test_hostile_documents_fail_in_parse_and_the_stage_keeps_working(
    api: httpx.AsyncClient, pipeline: Pipeline
) -> None:
    bomb = make_docx_bomb(4 * MAX_DOCX_UNCOMPRESSED_BYTES)
    cases = {
        "corrupt.pdf": (make_corrupt_pdf(), "unreadable_pdf"),
        "secret.pdf": (make_encrypted_pdf("Launch codes."), "encrypted_pdf"),
        "scan.pdf": (make_image_only_pdf(), "no_text"),
        "bomb.docx": (bomb, "docx_too_large"),
        "long.pdf": (make_many_page_pdf(MAX_PDF_PAGES + 1), "too_many_pages"),
    }
    assert all(len(data) <= MAX_UPLOAD_BYTES for data, _ in cases.values())
    answers = await asyncio.gather(
        *(upload(api, name, data, "hostile") for name, (data, _) in cases.items())
    )
    for name, answer in zip(cases, answers, strict=True):
        assert answer.status_code == 202, (name, answer.text)
    job_ids = [answer.json()["job_id"] for answer in answers]
    jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
    for name, job in zip(cases, jobs, strict=True):
        assert job["status"] == "failed", (name, job)
        assert job["error"]["code"] == cases[name][1], (name, job["error"])
        assert job["error"]["stage"] == "parse", (name, job["error"])
        assert job["error"]["retryable"] is False, (name, job["error"])
        assert job["error"]["message"].strip(), (name, job["error"])
    by_name = {job["filename"]: job for job in jobs}
    assert f"the limit is {MAX_PDF_PAGES}" in by_name["long.pdf"]["error"]["message"]
    assert "SLUICE_MAX_DOCX_UNCOMPRESSED_BYTES" in by_name["bomb.docx"]["error"]["message"]

    good = make_markdown("Kelp", {"Forests": "Kelp forests shelter sea otters and urchins."})
    answer = await upload(api, "kelp.md", good, "hostile")
    assert answer.status_code == 202, answer.text
    job = await wait_for_job(api, answer.json()["job_id"])
    assert job["status"] == "indexed", (job, pipeline.logs())
    await assert_nothing_lost(pipeline, api, [*job_ids, job["job_id"]])
