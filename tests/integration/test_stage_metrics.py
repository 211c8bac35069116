"""Each stage process serves Prometheus metrics that add up to what the pipeline did: every
message consumed ends succeeded or dead-lettered, and chunk counts match the jobs."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_image_only_pdf, make_markdown, make_pdf
from pipeline import Pipeline, free_port, start_pipeline, stop_pipeline, wait_for_job
from prometheus_client.parser import text_string_to_metric_families

from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES

# Small batches, so the larger documents fan out into several embed and index messages.
CHUNKS_PER_MESSAGE = 4
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    """The port each stage process serves /metrics on."""
    return {stage: free_port() for stage in STAGES}


@pytest.fixture(scope="module")
def measured(
    broker: BrokerHandle,
    metrics_ports: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """A pipeline of its own, so its counters start at zero."""
    ports = {f"SLUICE_{stage.upper()}_METRICS_PORT": str(p) for stage, p in metrics_ports.items()}
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("measured"),
        SLUICE_CHUNKS_PER_MESSAGE=str(CHUNKS_PER_MESSAGE),
        **ports,
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(measured: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the measured pipeline's gateway."""
    async with httpx.AsyncClient(base_url=measured.url, timeout=30) as client:
        yield client


def documents() -> dict[str, bytes]:
    """Distinct documents of different sizes, and one scan that parse cannot read."""
    long_pages = [
        " ".join(f"Ledger line {page}-{n}: {n * 17 % 101} crates of copper." for n in range(30))
        for page in range(3)
    ]
    return {
        "ledger.pdf": make_pdf(long_pages),
        "short.md": make_markdown("Short", {"Only": "A single short note about meadow voles."}),
        "garden.md": make_markdown(
            "Garden",
            {
                f"Bed {n}": f"Bed {n} grows {n * 3} rows of violets and quartz-grey stones." * 20
                for n in range(6)
            },
        ),
        "pages.pdf": make_pdf(["The first page talks of harbours.", "The second of lanterns."]),
        "scan.pdf": make_image_only_pdf(),
    }


def scrape(url: str) -> Samples:
    """Every sample at a /metrics URL, by (sample name, labels)."""
    answer = httpx.get(url, timeout=5)
    answer.raise_for_status()
    return parse_samples(answer.text)


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (sample name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def families(url: str) -> set[str]:
    """The metric family names at a /metrics URL (counters without their `_total`)."""
    return {f.name for f in text_string_to_metric_families(httpx.get(url, timeout=5).text)}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series was never touched."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def scrape_until(url: str, settled: Callable[[Samples], bool], deadline_s: float = 15.0) -> Samples:
    """Scrape until `settled` holds or the deadline passes; returns the last scrape.

    A stage counts a message after it acks it, which can be a moment after the gateway already
    shows the job's next state.
    """
    deadline = time.monotonic() + deadline_s
    samples = scrape(url)
    while not settled(samples) and time.monotonic() < deadline:
        time.sleep(0.1)
        samples = scrape(url)
    return samples


def settled(stage: str, consumed: int) -> Callable[[Samples], bool]:
    """True once `consumed` messages of `stage` were counted and each one has ended."""

    def check(samples: Samples) -> bool:
        ended = value(samples, "sluice_messages_succeeded_total", stage=stage) + total(
            samples, "sluice_messages_dead_lettered_total", stage=stage
        )
        seen = value(samples, "sluice_messages_consumed_total", stage=stage)
        return seen >= consumed and ended >= consumed

    return check


async def test_stage_counters_add_up_to_the_jobs(
    api: httpx.AsyncClient, measured: Pipeline, metrics_ports: dict[str, int]
) -> None:
    files = documents()
    n = len(files)
    answers = await asyncio.gather(
        *(
            api.post("/v1/documents", files={"file": (name, data)}, data={"collection": "metered"})
            for name, data in files.items()
        )
    )
    assert [a.status_code for a in answers] == [202] * n, [a.text for a in answers]
    jobs = await asyncio.gather(*(wait_for_job(api, a.json()["job_id"]) for a in answers))
    by_name: dict[str, dict[str, Any]] = {j["filename"]: j for j in jobs}
    assert by_name["scan.pdf"]["status"] == "failed", by_name["scan.pdf"]
    assert by_name["scan.pdf"]["error"]["code"] == "no_text"
    indexed = [j for j in jobs if j["status"] == "indexed"]
    assert len(indexed) == n - 1, jobs
    chunks = sum(j["progress"]["chunks_total"] for j in indexed)
    batches = sum(math.ceil(j["progress"]["chunks_total"] / CHUNKS_PER_MESSAGE) for j in indexed)
    # The test is only worth its name if some document fanned out into several batches.
    assert batches > len(indexed), [j["progress"] for j in indexed]

    urls = {stage: f"http://127.0.0.1:{port}/metrics" for stage, port in metrics_ports.items()}
    # Parse takes the scan twice: its first read sends its one page to OCR, as a range.
    expected_consumed = {"parse": n + 1, "chunk": n - 1, "embed": batches, "index": batches}
    scraped: dict[str, Samples] = {}
    for stage, url in urls.items():
        try:
            scraped[stage] = await asyncio.to_thread(
                scrape_until, url, settled(stage, expected_consumed[stage])
            )
        except httpx.HTTPError as exc:
            pytest.fail(f"stage {stage} serves no metrics at {url}: {exc!r}")

    parse = scraped["parse"]
    assert value(parse, "sluice_messages_consumed_total", stage="parse") == n + 1
    assert value(parse, "sluice_messages_succeeded_total", stage="parse") == n
    assert value(parse, "sluice_ocr_pages_total", engine="tesseract") == 1
    assert value(parse, "sluice_messages_dead_lettered_total", stage="parse", code="no_text") == 1
    assert total(parse, "sluice_messages_dead_lettered_total", stage="parse") == 1
    for stage in ("chunk", "embed", "index"):
        samples = scraped[stage]
        expected = expected_consumed[stage]
        consumed = value(samples, "sluice_messages_consumed_total", stage=stage)
        succeeded = value(samples, "sluice_messages_succeeded_total", stage=stage)
        assert (stage, consumed, succeeded) == (stage, expected, expected)
        assert total(samples, "sluice_messages_dead_lettered_total", stage=stage) == 0, stage
    for stage in ("embed", "index"):
        processed = value(scraped[stage], "sluice_chunks_processed_total", stage=stage)
        assert processed == chunks, (stage, processed, chunks)
    for stage in STAGES:
        handled = value(scraped[stage], "sluice_handler_duration_seconds_count", stage=stage)
        # Parse's handler also ran (and raised) for the scan.
        assert expected_consumed[stage] - (stage == "parse") <= handled, (stage, handled)
        assert handled <= expected_consumed[stage], (stage, handled)
    # Every chunk went through the model exactly once; messages share calls, so there are at
    # most as many calls as messages.
    embed = scraped["embed"]
    assert value(embed, "sluice_embed_batch_size_sum") == chunks
    assert 1 <= value(embed, "sluice_embed_batch_size_count") <= batches

    exposed = {stage: await asyncio.to_thread(families, url) for stage, url in urls.items()}
    for stage, names in exposed.items():
        for family in (
            "sluice_messages_consumed",
            "sluice_messages_succeeded",
            "sluice_messages_retried",
            "sluice_messages_dead_lettered",
            "sluice_handler_duration_seconds",
            "sluice_chunks_processed",
        ):
            assert family in names, (stage, family)
    assert "sluice_embed_batch_size" in exposed["embed"]

    gateway = await api.get("/metrics")
    assert gateway.status_code == 200, gateway.text
    front = parse_samples(gateway.text)
    assert value(front, "sluice_uploads_total", status="202") == n
    assert value(front, "sluice_upload_answer_seconds_count") == n
    assert value(front, "sluice_jobs", status="indexed") == n - 1
    assert value(front, "sluice_jobs", status="failed") == 1
