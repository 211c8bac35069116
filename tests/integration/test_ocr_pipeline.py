"""Scans and images on a real broker: read with OCR on the right page, a mixed PDF keeps both
kinds of page, and a big scan is shared by two parse processes with bounded memory."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped, import-not-found, unused-ignore]
import pytest
from broker import BrokerHandle
from documents import (
    make_mixed_pdf,
    make_png_of_page,
    make_scanned_pdf,
    make_text_pdf_pages,
    make_tiff_of_pages,
)
from pipeline import Pipeline, free_port, launch, sluice_command, stop_pipeline, wait_for_job
from prometheus_client.parser import text_string_to_metric_families

# One distinctive sentence a page, so a search names the page it was read on.
PAGES = [
    "The orange heron nests on the first page of this scanned report.",
    "Copper kettles whistle loudly on the second page of the scan.",
    "Seven lighthouse keepers wrote letters on the third page.",
]
BIG_SCAN_PAGES = 200
# Per OCR worker process, whatever the page count (the figure the test prints is the measure).
WORKER_RSS_LIMIT_MB = 600


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    """Where each of the two parse processes serves /metrics."""
    return {"parse": free_port(), "parse-2": free_port()}


@pytest.fixture(scope="module")
def scanning(
    broker: BrokerHandle, metrics_ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A pipeline with two parse processes, room for big scans, and small page ranges."""
    running = launch(
        broker,
        tmp_path_factory.mktemp("scanning"),
        {
            "SLUICE_MAX_UPLOAD_BYTES": str(64 << 20),
            "SLUICE_MAX_PDF_PAGES": str(BIG_SCAN_PAGES),
            "SLUICE_OCR_PAGES_PER_RANGE": "10",
            "SLUICE_PARSE_METRICS_PORT": str(metrics_ports["parse"]),
        },
        commands={"parse-2": [*sluice_command(), "stage", "parse"]},
        process_env={"parse-2": {"SLUICE_PARSE_METRICS_PORT": str(metrics_ports["parse-2"])}},
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(scanning: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the scanning pipeline's gateway."""
    async with httpx.AsyncClient(base_url=scanning.url, timeout=60) as client:
        yield client


async def ingest(api: httpx.AsyncClient, name: str, data: bytes, collection: str) -> dict[str, Any]:
    """Upload one file and wait for its job to end."""
    answer = await api.post(
        "/v1/documents", files={"file": (name, data)}, data={"collection": collection}
    )
    assert answer.status_code == 202, answer.text
    return await wait_for_job(api, answer.json()["job_id"], deadline_s=600)


async def hits(api: httpx.AsyncClient, query: str, collection: str) -> list[dict[str, Any]]:
    """The search results for a query."""
    answer = await api.get("/v1/search", params={"q": query, "collection": collection, "k": 3})
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


async def test_a_scan_a_png_and_a_tiff_are_read_on_the_right_page(api: httpx.AsyncClient) -> None:
    original = make_text_pdf_pages(PAGES)
    files = {
        "scan.pdf": (make_scanned_pdf(original), [1, 2, 3]),
        "page2.png": (make_png_of_page(original, 2), [1]),
        "pages.tiff": (make_tiff_of_pages(original), [1, 2, 3]),
    }
    collection = f"ocr-{uuid.uuid4().hex[:8]}"
    jobs = await asyncio.gather(
        *(ingest(api, name, data, collection) for name, (data, _) in files.items())
    )
    for job in jobs:
        assert job["status"] == "indexed", job["error"]
        assert job["progress"]["pages_read"] == job["progress"]["pages"], job
    # Every page of the scan and the TIFF, and the PNG's one page, found where it was read.
    for name, (_, pages) in files.items():
        for page in pages:
            sentence = PAGES[1] if name == "page2.png" else PAGES[page - 1]
            found = [h for h in await hits(api, sentence, collection) if h["filename"] == name]
            assert found, (name, page, await hits(api, sentence, collection))
            assert found[0]["page"] == page, (name, found[0])
            # OCR may misread a word; the rest of the sentence must be there.
            assert _recall(sentence, found[0]["text"]) >= 0.8, found[0]["text"]


async def test_a_mixed_pdf_keeps_its_text_pages_and_reads_its_scanned_ones(
    api: httpx.AsyncClient,
) -> None:
    # Pages 1 and 3 have a text layer, page 2 is an image of a page.
    mixed = make_mixed_pdf(PAGES, scanned={2})
    collection = f"mixed-{uuid.uuid4().hex[:8]}"
    job = await ingest(api, "mixed.pdf", mixed, collection)
    assert job["status"] == "indexed", job["error"]
    assert job["progress"]["pages"] == 3 and job["progress"]["pages_read"] == 3, job
    for page, sentence in enumerate(PAGES, start=1):
        (best, *_) = await hits(api, sentence, collection)
        assert best["page"] == page, (sentence, best)
    # The text layer's pages are taken as they are, word for word.
    (first, *_) = await hits(api, PAGES[0], collection)
    assert PAGES[0] in " ".join(first["text"].split())


async def test_deleting_a_scan_leaves_none_of_its_text_in_the_blob_store(
    api: httpx.AsyncClient, scanning: Pipeline
) -> None:
    mixed = make_mixed_pdf(PAGES, scanned={2})
    job = await ingest(api, "to-delete.pdf", mixed, f"gone-{uuid.uuid4().hex[:8]}")
    assert job["status"] == "indexed", job["error"]
    notes = scanning.data_dir / "blobs" / "notes"
    assert any(job["job_id"] in n.name for n in notes.iterdir())
    answer = await api.delete(f"/v1/documents/{job['document_id']}")
    assert answer.status_code == 204, answer.text
    assert not [n.name for n in notes.iterdir() if job["job_id"] in n.name]


async def test_a_big_scan_is_shared_by_two_parse_processes_with_bounded_memory(
    api: httpx.AsyncClient, scanning: Pipeline, metrics_ports: dict[str, int]
) -> None:
    pages = [f"Ledger sheet {n} records the tide at harbour {n}." for n in range(BIG_SCAN_PAGES)]
    scan = make_scanned_pdf(make_text_pdf_pages(pages))
    before = {name: await _ocr_pages(port) for name, port in metrics_ports.items()}
    parse_pids = {name: scanning.processes[name].pid for name in ("parse", "parse-2")}
    with _PeakRss(parse_pids) as peaks:
        job = await ingest(api, "ledger.pdf", scan, f"big-{uuid.uuid4().hex[:8]}")
    assert job["status"] == "indexed", job["error"]
    assert job["progress"]["pages"] == job["progress"]["pages_read"] == BIG_SCAN_PAGES
    read = {name: await _ocr_pages(port) - before[name] for name, port in metrics_ports.items()}
    print(f"pages read with OCR per parse process: {read}")
    print(f"peak RSS per OCR worker, MB: {peaks.mb}")
    assert sum(read.values()) >= BIG_SCAN_PAGES
    assert all(n > 0 for n in read.values()), read
    assert peaks.mb and max(peaks.mb.values()) < WORKER_RSS_LIMIT_MB, peaks.mb


async def _ocr_pages(port: int) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sluice_ocr_pages_total"
    )


class _PeakRss:
    """Samples the resident memory of every process under the given parse processes (their
    parse and OCR workers) while the block runs; `mb` is the highest seen per process."""

    def __init__(self, parents: dict[str, int]) -> None:
        self.parents = parents
        self.mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.parents.items():
                try:
                    children = psutil.Process(pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for child in children:
                    try:
                        rss = child.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        continue
                    key = f"{name}/{child.pid}"
                    self.mb[key] = max(self.mb.get(key, 0.0), round(rss, 1))
            time.sleep(0.2)


def _recall(sentence: str, text: str) -> float:
    """The share of the sentence's words found in `text`."""
    wanted = _words(sentence)
    return len(wanted & _words(text)) / len(wanted)


def _words(text: str) -> set[str]:
    return {w.strip(".,").lower() for w in text.split() if w.strip(".,")}
