"""The web page in a real headless Chromium against a real gateway and pipeline: files dropped
on the page reach `indexed` live, rejections and failures show their reasons, Retry resumes a
failed job, search highlights the query, filters survive a reload, the stages shown come from
the gateway's config, and API keys are asked for.

Screenshots of each state go to test-artifacts/browser/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import (
    DOCX_SENTENCE,
    HTML_SENTENCE,
    MD_SENTENCE,
    PDF_PAGE_2,
    make_docx,
    make_gif,
    make_html,
    make_image_only_pdf,
    make_markdown,
    make_pdf,
)
from fakes.otlp_receiver import FakeOtlpReceiver
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job
from playwright.async_api import FileChooser, Page, Route, expect

from browser.page_kit import (
    ARTIFACTS,
    drop,
    expect_state,
    live_row,
    open_page,
    payload,
    pick,
    snap,
    unique,
)

JAEGER_UI = "http://127.0.0.1:16686"
RABBITMQ_UI = "http://127.0.0.1:15672"
API_KEY = "page-key-7f3a"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver() -> Iterator[FakeOtlpReceiver]:
    """Collects spans, so jobs carry a trace id and the page can link to their trace."""
    with FakeOtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def sluice(
    broker: BrokerHandle, receiver: FakeOtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """One real pipeline for the module, with operator UI links configured."""
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("page"),
        SLUICE_JAEGER_UI_URL=JAEGER_UI,
        SLUICE_RABBITMQ_UI_URL=RABBITMQ_UI,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture(scope="module")
def keyed(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A pipeline that wants an API key, and flags a job stalled after two quiet seconds."""
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("page-keyed"),
        SLUICE_API_KEYS=API_KEY,
        SLUICE_STALLED_AFTER_S="2",
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


def track_connections(page: Page) -> dict[str, Any]:
    """Counts the page's uploads and event streams, and the most open at once."""
    seen: dict[str, Any] = {"open": 0, "max_open": 0, "streams": 0, "polls": 0}
    pooled = re.compile(r"/v1/documents$|/v1/jobs/[^/?]+/events$")

    def opened(request: Any) -> None:
        if re.search(r"/v1/jobs/[^/?]+$", request.url):
            seen["polls"] += 1
        if pooled.search(request.url):
            seen["streams"] += request.url.endswith("/events")
            seen["open"] += 1
            seen["max_open"] = max(seen["max_open"], seen["open"])

    def closed(request: Any) -> None:
        if pooled.search(request.url):
            seen["open"] -= 1

    page.on("request", opened)
    page.on("requestfinished", closed)
    page.on("requestfailed", closed)
    return seen


# Playwright's request events are not ordered across requests, so counting with them can
# overlap a finished request with the next by one. This counts in the page instead: a pooled
# request is open from the fetch call until its body has been read to the end or cancelled.
POOL_PROBE = """
(() => {
  const pooled = /\\/v1\\/documents$|\\/v1\\/jobs\\/[^/?]+\\/events$/;
  const probe = (window.__pooledFetches = { open: 0, max: 0 });
  const original = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const url = typeof input === "string" ? input : input.url;
    if (!pooled.test(url.split("?")[0])) return original(input, init);
    probe.open += 1;
    probe.max = Math.max(probe.max, probe.open);
    let released = false;
    const release = () => { if (!released) { released = true; probe.open -= 1; } };
    try {
      const response = await original(input, init);
      if (!response.body) { release(); return response; }
      const reader = response.body.getReader();
      const body = new ReadableStream({
        async pull(controller) {
          let step;
          try { step = await reader.read(); } catch (error) { release(); throw error; }
          if (step.done) { release(); controller.close(); } else controller.enqueue(step.value);
        },
        cancel(reason) { release(); return reader.cancel(reason); },
      });
      return new Response(body, {
        status: response.status, statusText: response.statusText, headers: response.headers,
      });
    } catch (error) {
      release();
      throw error;
    }
  };
})();
"""


async def test_dropped_and_picked_files_each_reach_indexed_live(
    page: Page, sluice: Pipeline
) -> None:
    seen = track_connections(page)
    await open_page(page, sluice.url, unique("mixed"))
    await expect(page.locator("#tool-links a")).to_have_text(
        ["RabbitMQ management", "Jaeger traces"]
    )
    await pick(
        page,
        {
            "terns.pdf": make_pdf(["Seabirds of the north.", PDF_PAGE_2]),
            "audit.docx": make_docx([DOCX_SENTENCE], [["Item", "Count"], ["Bolts", "12"]]),
        },
    )
    await drop(page, {"lighthouse.html": make_html("Lighthouses", [HTML_SENTENCE])})
    # Every file has its row at once, before any of them is done.
    await expect(page.locator("#live-rows tr")).to_have_count(3, timeout=2_000)
    await snap(page, "01-uploads-in-flight")
    for name in ("terns.pdf", "audit.docx", "lighthouse.html"):
        await expect_state(live_row(page, name), "indexed")
    await expect(live_row(page, "terns.pdf").locator(".count")).to_have_text(
        re.compile(r"^\d+ chunks, 2 pages$")
    )
    await expect(live_row(page, "terns.pdf").locator("progress")).to_have_js_property("value", 1)
    await snap(page, "02-uploads-indexed")
    # Progress came from the event streams, not from polling the job.
    assert seen["streams"] >= 3 and seen["polls"] == 0, seen


async def test_many_files_upload_a_few_at_a_time(page: Page, sluice: Pipeline) -> None:
    seen = track_connections(page)
    await page.add_init_script(POOL_PROBE)
    await open_page(page, sluice.url, unique("many"))
    notes = {
        f"note-{n:02d}.md": make_markdown(f"Note {n}", {"Body": f"Harbour note number {n}."})
        for n in range(12)
    }
    await drop(page, notes)
    await expect(page.locator("#live-rows tr")).to_have_count(12, timeout=2_000)
    for name in notes:
        await expect_state(live_row(page, name), "indexed")
    # Uploads and live streams share four connections, whatever the size of the drop.
    pooled = await page.evaluate("() => window.__pooledFetches")
    assert 1 <= pooled["max"] <= 4, (pooled, seen)
    assert seen["streams"] == 12, seen


async def test_an_unsupported_file_shows_its_reason_and_the_rest_carry_on(
    page: Page, sluice: Pipeline
) -> None:
    async with httpx.AsyncClient(base_url=sluice.url) as api:
        refused = await api.post("/v1/documents", files={"file": ("scan.pdf", make_gif())})
    assert refused.status_code == 415
    reason = refused.json()["error"]["message"]

    await open_page(page, sluice.url, unique("mixed"))
    await drop(
        page,
        {
            "scan.pdf": make_gif(),
            "bread.md": make_markdown("Bread", {"Method": MD_SENTENCE}),
        },
    )
    rejected = live_row(page, "scan.pdf")
    await expect_state(rejected, "rejected", 10_000)
    await expect(rejected.locator(".details")).to_have_text(reason)
    await expect_state(live_row(page, "bread.md"), "indexed")
    await snap(page, "03-unsupported-file-rejected")


async def test_a_failed_job_shows_stage_and_reason_and_retry_finishes_it(
    page: Page, sluice: Pipeline
) -> None:
    collection = unique("blocked")
    # A plain file where the collection's table belongs makes every index write fail.
    blocker = sluice.data_dir / "index" / f"chunks_{collection}.lance"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")

    await open_page(page, sluice.url, collection)
    await pick(page, {"blocked.md": make_markdown("Blocked", {"A": MD_SENTENCE})})
    row = live_row(page, "blocked.md")
    await expect_state(row, "failed")
    details = row.locator(".details")
    await expect(details.locator(".error")).to_contain_text("Failed in index:")
    assert len(await details.locator(".error").inner_text()) > len("Failed in index: ") + 10
    trace = details.get_by_role("link", name="Trace in Jaeger")
    await expect(trace).to_have_attribute(
        "href", re.compile(rf"^{JAEGER_UI}/trace/[0-9a-f]{{32}}$")
    )
    await snap(page, "04-failed-with-reason")

    blocker.unlink()
    await details.get_by_role("button", name="Retry blocked.md").click()
    await expect_state(row, "indexed")
    await expect(details.locator(".error")).to_have_count(0)
    await snap(page, "05-retried-and-indexed")


async def test_search_shows_the_document_and_highlights_the_query(
    page: Page, sluice: Pipeline
) -> None:
    collection = unique("search")
    await open_page(page, sluice.url, collection)
    await pick(
        page,
        {
            "bread.md": make_markdown("Bread", {"Method": MD_SENTENCE}),
            "terns.pdf": make_pdf(["Seabirds of the north.", PDF_PAGE_2]),
        },
    )
    for name in ("bread.md", "terns.pdf"):
        await expect_state(live_row(page, name), "indexed")

    await page.get_by_label("Query").fill("Which birds migrate from pole to pole?")
    await page.locator("#search-collection").fill(collection)
    await page.get_by_label("Results").fill("2")
    await page.get_by_role("button", name="Search", exact=True).click()
    first = page.locator("#search-results li").first
    # The gateway loads its query model at the first search: seconds, not milliseconds.
    await expect(first.locator(".meta strong")).to_have_text("terns.pdf", timeout=60_000)
    await expect(first.locator(".meta")).to_contain_text("page 2")
    await expect(first.locator("mark")).to_contain_text(["migrate", "pole", "pole"])
    await expect(page.locator("#search-results li")).to_have_count(2)
    await snap(page, "06-search-results")


async def test_jobs_view_keeps_its_filters_across_a_reload(page: Page, sluice: Pipeline) -> None:
    collection = unique("filters")
    async with httpx.AsyncClient(base_url=sluice.url, timeout=30) as api:
        ids = []
        for name, data, coll in (
            ("good.md", make_markdown("Good", {"A": MD_SENTENCE}), collection),
            ("scan.pdf", make_image_only_pdf(), collection),
            ("elsewhere.md", make_markdown("Other", {"B": HTML_SENTENCE}), unique("other")),
        ):
            answer = await api.post(
                "/v1/documents", files={"file": (name, data)}, data={"collection": coll}
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["job_id"])
        ended = [await wait_for_job(api, job_id) for job_id in ids]
    assert [job["status"] for job in ended] == ["indexed", "failed", "indexed"]

    await page.goto(f"{sluice.url}/?status=failed&collection={collection}")
    rows = page.locator("#jobs-rows tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td.file")).to_have_text("scan.pdf")
    await expect(rows.first.locator(".error")).to_contain_text("Failed in parse:")
    await expect(page.locator("#filter-status")).to_have_value("failed")
    await expect(page.locator("#filter-collection")).to_have_value(collection)

    # Change a filter with the form: the URL follows, and a reload keeps it.
    await page.locator("#filter-status").select_option("indexed")
    await page.get_by_role("button", name="Show jobs").click()
    await expect(page).to_have_url(re.compile(rf"\?status=indexed&collection={collection}$"))
    await page.reload()
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td.file")).to_have_text("good.md")
    await expect(page.locator("#filter-status")).to_have_value("indexed")
    await snap(page, "07-jobs-filtered-after-reload")

    await page.goto(f"{sluice.url}/?stalled=true&collection={collection}")
    await expect(page.locator("#jobs-message")).to_have_text("No jobs match these filters.")
    await expect(page.locator("#filter-stalled")).to_have_value("true")


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
        **extra,
    }


async def test_the_page_takes_the_stages_from_the_config(page: Page, sluice: Pipeline) -> None:
    """A pipeline the page has never seen (enrich on): its statuses come from /v1/config, and
    the progress bar gives each configured stage an equal share."""
    async with httpx.AsyncClient(base_url=sluice.url) as api:
        real = (await api.get("/v1/config")).json()
    assert real["stages"] == [
        {"name": "parse", "status": "parsing"},
        {"name": "chunk", "status": "chunking"},
        {"name": "embed", "status": "embedding"},
        {"name": "index", "status": "indexing"},
    ]
    assert real["statuses"] == [
        "queued",
        "parsing",
        "chunking",
        "embedding",
        "indexing",
        "indexed",
        "failed",
    ]
    stages = [*real["stages"][:2], {"name": "enrich", "status": "enriching"}, *real["stages"][2:]]
    statuses = ["queued", *(s["status"] for s in stages), "indexed", "failed"]
    failure = {"stage": "enrich", "code": "no_text", "message": "no words", "retryable": False}
    embedding = {"pages": None, "chunks_total": 6, "chunks_embedded": 3, "chunks_indexed": 0}
    jobs = [
        listed_job("enriching"),
        listed_job("embedding", progress=embedding),
        listed_job("failed", error=failure),
        listed_job("queued"),
    ]

    async def scripted_config(route: Route) -> None:
        await route.fulfill(json={**real, "stages": stages, "statuses": statuses})

    async def scripted_jobs(route: Route) -> None:
        await route.fulfill(json={"jobs": jobs, "next_cursor": None})

    await page.route(re.compile(r"/v1/config$"), scripted_config)
    await page.route(re.compile(r"/v1/jobs\?"), scripted_jobs)
    await page.goto(f"{sluice.url}/?status=enriching")
    rows = page.locator("#jobs-rows tr")
    await expect(rows).to_have_count(len(jobs))
    # The filter offers the configured statuses, and the URL's choice among them survives.
    await expect(page.locator("#filter-status option")).to_have_text(["any", *statuses])
    await expect(page.locator("#filter-status")).to_have_value("enriching")
    await expect(rows.nth(1).locator(".count")).to_have_text("3 / 6 chunks embedded")
    await expect(rows.nth(2).locator(".error")).to_contain_text("Failed in enrich:")
    values = await rows.locator("progress").evaluate_all("(bars) => bars.map((b) => b.value)")
    # Five stages of a fifth each: enrich starts at 2/5; embed at 3/5, half its chunks done.
    assert values == pytest.approx([2 / 5, 3 / 5 + 1 / 10, 2 / 5, 0])
    await snap(page, "07b-stages-from-config")


async def test_keyboard_reaches_the_file_button_and_search_with_a_visible_focus_ring(
    page: Page, sluice: Pipeline
) -> None:
    # Subscribed well before the key press: `expect_file_chooser` turns interception on
    # asynchronously, and the press could win that race (the native picker then opens).
    choosers: asyncio.Queue[FileChooser] = asyncio.Queue()
    page.on("filechooser", choosers.put_nowait)
    await open_page(page, sluice.url, unique("keys"))
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, select')]
                .filter((e) => e.labels.length === 0 && !e.getAttribute('aria-label'))
                .map((e) => e.id)"""
    )
    assert unlabelled == []

    async def tab_to(element_id: str) -> dict[str, str]:
        for _ in range(40):
            await page.keyboard.press("Tab")
            focused = await page.evaluate("() => document.activeElement.id")
            if focused == element_id:
                ring: dict[str, str] = await page.evaluate(
                    """() => { const s = getComputedStyle(document.activeElement);
                               return {style: s.outlineStyle, width: s.outlineWidth}; }"""
                )
                return ring
        raise AssertionError(f"Tab never reached #{element_id}")

    ring = await tab_to("pick-files")
    assert ring["style"] == "solid" and ring["width"] == "3px", ring
    # Only the viewport: after a full-page capture Chromium no longer opened the file picker.
    await page.screenshot(path=str(ARTIFACTS / "08-keyboard-focus-on-file-button.png"))
    # Enter on the focused button opens the file picker; the chosen file is uploaded.
    await page.keyboard.press("Enter")
    await (await asyncio.wait_for(choosers.get(), 10)).set_files(
        payload("kb.md", make_markdown("K", {"A": "B"}))
    )
    await expect_state(live_row(page, "kb.md"), "indexed")

    ring = await tab_to("search-q")
    assert ring["style"] == "solid" and ring["width"] == "3px", ring


async def test_with_api_keys_the_page_asks_for_a_key_then_works(
    page: Page, keyed: Pipeline
) -> None:
    await page.goto(keyed.url)
    dialog = page.get_by_role("dialog", name="API key needed")
    await expect(dialog).to_be_visible()
    # Links to internal UIs are not shown before the key is known.
    await expect(page.locator("#tool-links a")).to_have_count(0)
    await snap(page, "09-asks-for-api-key")

    await dialog.get_by_label("API key").fill("not-the-key")
    await dialog.get_by_role("button", name="Use this key").click()
    await expect(dialog).to_contain_text("not accepted")
    await dialog.get_by_label("API key").fill(API_KEY)
    await dialog.get_by_role("button", name="Use this key").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#jobs-message")).to_have_text("No jobs yet.")

    # With the parse stage stopped, an upload sits queued until it is flagged stalled.
    assert keyed.terminate("parse") == 0
    try:
        await pick(page, {"waiting.md": make_markdown("Waiting", {"A": MD_SENTENCE})})
        row = live_row(page, "waiting.md")
        await expect(row.locator(".tag.stalled")).to_be_visible(timeout=30_000)
        await page.goto(f"{keyed.url}/?stalled=true")
        # The key was kept for the session: no second question after the reload.
        await expect(page.locator("#jobs-rows tr.is-stalled")).to_have_count(1)
        await expect(dialog).to_be_hidden()
        await snap(page, "10-keyed-stalled-job-listed")
    finally:
        keyed.start("parse")
    await page.goto(keyed.url)
    await page.locator("#jobs-rows tr").first.wait_for()
    async with httpx.AsyncClient(
        base_url=keyed.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as api:
        job_id = (await api.get("/v1/jobs")).json()["jobs"][0]["job_id"]
        assert (await wait_for_job(api, job_id))["status"] == "indexed"
    await page.reload()
    await expect(page.locator("#jobs-rows tr .state")).to_have_text(["indexed"])
