"""The page's pipeline panel and what a newcomer tripped over, in a real Chromium against a
real gateway and stage processes: a row per stage with its lanes' depths and workers, a
waiting job's place in line, the collection remembered and offered, and Retry only where a
retry can help.

Screenshots go to test-artifacts/browser/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from broker import BrokerHandle
from documents import MD_SENTENCE, make_image_only_pdf, make_markdown
from pipeline import Pipeline, start_pipeline, stop_pipeline
from playwright.async_api import Page, Route, expect

from browser.page_kit import expect_state, live_row, open_page, pick, snap, unique
from contracts.events import WorkerHeartbeat
from gateway.http.pipeline_health import PipelineHealth

pytestmark = pytest.mark.integration

STAGES = ["parse", "chunk", "embed", "index", "webhook"]


@pytest.fixture(scope="module")
def sluice(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A real pipeline whose stage processes beat twice a second."""
    running = start_pipeline(
        broker, tmp_path_factory.mktemp("page-pipeline"), SLUICE_HEARTBEAT_EVERY_S="0.5"
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


def stage_row(page: Page, stage: str) -> Any:
    """One stage's row of the pipeline panel."""
    return page.locator(f'#pipeline-rows tr[data-stage="{stage}"]')


async def test_the_panel_shows_each_stage_its_lanes_and_workers_and_a_waiting_jobs_place(
    page: Page, sluice: Pipeline
) -> None:
    await open_page(page, sluice.url, unique("waiting"))
    await expect(page.locator("#pipeline-rows th.stage")).to_have_text(
        [*STAGES[:-1], re.compile(r"^webhook\s*side$")]
    )
    for stage in STAGES[:-1]:
        await expect(stage_row(page, stage).locator(".workers")).to_have_text("1 healthy")
    # Nothing runs the side stage in this pipeline: the panel says so rather than hiding it.
    await expect(stage_row(page, "webhook").locator(".workers")).to_have_text("none running")

    # With parse stopped, what the page uploads waits in parse's interactive lane.
    assert sluice.terminate("parse") == 0
    try:
        await expect(stage_row(page, "parse").locator(".workers")).to_have_text("none running")
        notes = {f"wait-{n}.md": make_markdown(f"Wait {n}", {"A": MD_SENTENCE}) for n in (1, 2)}
        await pick(page, {"wait-1.md": notes["wait-1.md"]})
        await expect_state(live_row(page, "wait-1.md"), "queued", 10_000)
        await pick(page, {"wait-2.md": notes["wait-2.md"]})
        second = live_row(page, "wait-2.md")
        await expect_state(second, "queued", 10_000)
        # One job ahead of it, and nothing finished yet to estimate from.
        await expect(second.locator(".queue")).to_have_text(
            re.compile(r"^position 2(, about \d+ (s|min))?$")
        )
        await expect(second.locator(".tag.priority")).to_have_text("interactive")
        lane = stage_row(page, "parse").locator(".lane-interactive")
        await expect(lane).to_have_text("2 waiting · 0 in hand")
        await expect(stage_row(page, "parse").locator(".lane-bulk")).to_have_text(
            "0 waiting · 0 in hand"
        )
        await snap(page, "11-pipeline-panel-parse-stopped")
    finally:
        sluice.start("parse")
    for name in notes:
        await expect_state(live_row(page, name), "indexed")
    await expect(second.locator(".queue")).to_have_count(0)
    await expect(stage_row(page, "parse").locator(".lane-interactive")).to_have_text(
        "0 waiting · 0 in hand"
    )
    await expect(stage_row(page, "parse").locator(".workers")).to_have_text("1 healthy")


def scripted_pipeline() -> dict[str, Any]:
    """A stale answer built by the gateway's own bookkeeping: a backlog, one worker gone quiet."""
    now = datetime.now(UTC)
    health = PipelineHealth(STAGES[:-1], STAGES[-1:], started_at=now - timedelta(hours=1))
    for n, second in enumerate(range(0, 60, 6)):
        beat = WorkerHeartbeat(
            worker_id="w1",
            stage="embed",
            host="box",
            pid=7,
            sluice_version="test",
            started_at=now - timedelta(minutes=5),
            at=now - timedelta(seconds=60 - second),
            every_s=1.0,
            processed=n * n,
        )
        health.hear(beat, float(second), now - timedelta(seconds=60 - second))
        health.record("embed", {"interactive": 3, "bulk": 40 - n}, {"interactive": 1}, second, now)
    answer = health.snapshot(70.0, stale=True, gateway_id="gw")
    body: dict[str, Any] = answer.model_dump(mode="json", by_alias=True)
    return body


async def test_the_panel_says_when_its_numbers_are_stale_and_charts_the_last_minute(
    page: Page, sluice: Pipeline
) -> None:
    answer = scripted_pipeline()

    async def pipeline(route: Route) -> None:
        await route.fulfill(json=answer)

    await page.route(re.compile(r"/v1/pipeline$"), pipeline)
    await open_page(page, sluice.url)
    await expect(page.locator("#pipeline-message")).to_have_text(
        "The gateway cannot reach RabbitMQ: these are the last numbers it had."
    )
    embed = stage_row(page, "embed")
    await expect(embed.locator(".lane-bulk")).to_have_text("31 waiting · 0 in hand")
    await expect(embed.locator(".workers")).to_have_text("0 of 1 healthy")
    await expect(embed).to_have_class(re.compile(r"\bis-unwell\b"))
    # Drawn by the page itself: one line for what came in, one for what went out.
    chart = embed.locator("svg.chart")
    await expect(chart.locator("polyline")).to_have_count(2)
    points = await chart.locator("polyline.out").get_attribute("points")
    assert points is not None and len(points.split()) == len(answer["stages"]["embed"]["history"])
    # A stage with no samples yet gets an empty chart, not a made-up line.
    await expect(stage_row(page, "parse").locator("svg.chart polyline")).to_have_count(0)
    await snap(page, "12-pipeline-panel-stale")


def listed_job(status: str, **extra: Any) -> dict[str, Any]:
    """A job as `GET /v1/jobs` lists it, for a page whose API answers are scripted."""
    return {
        "job_id": uuid.uuid4().hex,
        "document_id": uuid.uuid4().hex,
        "collection": "default",
        "filename": f"{status}.md",
        "status": status,
        "progress": {"pages": None, "chunks_total": 6, "chunks_embedded": 0, "chunks_indexed": 0},
        "error": None,
        "stalled": False,
        "trace_id": None,
        "updated_at": "2024-05-01T12:00:00Z",
        "priority": "interactive",
        "queue": {"position": None, "eta_s": None},
        **extra,
    }


async def test_a_waiting_jobs_row_shows_its_lane_and_place_and_a_busy_one_does_not(
    page: Page, sluice: Pipeline
) -> None:
    jobs = [
        listed_job("queued", priority="bulk", queue={"position": 2, "eta_s": 42.4}),
        listed_job("chunking", queue={"position": 4, "eta_s": 300.0}),
        listed_job("embedding", queue={"position": 0, "eta_s": 3.0}),
    ]

    async def scripted_jobs(route: Route) -> None:
        await route.fulfill(json={"jobs": jobs, "next_cursor": None})

    await page.route(re.compile(r"/v1/jobs\?"), scripted_jobs)
    await open_page(page, sluice.url)
    rows = page.locator("#jobs-rows tr")
    await expect(rows).to_have_count(3)
    await expect(rows.nth(0).locator(".queue")).to_have_text("position 3, about 42 s")
    await expect(rows.nth(0).locator(".tag.priority")).to_have_text("bulk")
    # Waiting for the chunk stage behind four others.
    await expect(rows.nth(1).locator(".queue")).to_have_text("position 5, about 5 min")
    # Being worked on: no place in line to show.
    await expect(rows.nth(2).locator(".queue")).to_have_count(0)
    await expect(rows.nth(2).locator(".tag.priority")).to_have_count(0)


async def test_the_collection_is_remembered_and_the_existing_ones_are_offered(
    page: Page, sluice: Pipeline
) -> None:
    collection = unique("papers")

    async def collections(route: Route) -> None:
        await route.fulfill(json={"collections": ["alpha", {"collection": "beta"}]})

    await page.route(re.compile(r"/v1/collections$"), collections)
    await open_page(page, sluice.url, collection)
    await pick(page, {"terns.md": make_markdown("Terns", {"Travel": MD_SENTENCE})})
    await expect_state(live_row(page, "terns.md"), "indexed")

    # A newcomer comes back later: both fields start at the collection used, not `default`.
    await page.reload()
    await expect(page.locator("#upload-collection")).to_have_value(collection)
    await expect(page.locator("#search-collection")).to_have_value(collection)
    # The gateway's collections and the ones this browser used (and the listed jobs' too).
    options = page.locator("#collection-options option")
    await expect(options).not_to_have_count(0)
    offered = await options.evaluate_all("(os) => os.map((o) => o.value)")
    assert {"alpha", "beta", collection} <= set(offered) and "default" not in offered, offered
    for field in ("#upload-collection", "#search-collection", "#filter-collection"):
        await expect(page.locator(field)).to_have_attribute("list", "collection-options")

    # So a search without touching the field finds what was uploaded.
    await page.get_by_label("Query").fill("bread dough")
    await page.get_by_role("button", name="Search", exact=True).click()
    # The gateway loads its query model at the first search: seconds, not milliseconds.
    await expect(page.locator("#search-results li .meta strong").first).to_have_text(
        "terns.md", timeout=60_000
    )


async def test_retry_is_offered_only_where_a_retry_can_help(page: Page, sluice: Pipeline) -> None:
    await open_page(page, sluice.url, unique("scans"))
    # No text layer and nothing to read: the file itself is the problem.
    await pick(page, {"scan.pdf": make_image_only_pdf()})
    row = live_row(page, "scan.pdf")
    await expect_state(row, "failed")
    details = row.locator(".details")
    await expect(details.locator(".error")).to_contain_text("Failed in parse:")
    await expect(details.get_by_role("button", name=re.compile("^Retry"))).to_have_count(0)
    await expect(details.locator(".no-retry")).to_have_text(
        "A retry cannot help with this file: upload a fixed file."
    )
    await snap(page, "13-failed-not-retryable")
