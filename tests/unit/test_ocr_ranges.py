"""The parse stage's page ranges, called directly with real OCR: a scan is split into ranges
for the parse queue, any worker reads any range, the last one puts the document together, and
a range that comes back after a crash finds it done. The job counts them as units of parse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from documents import (
    make_image_only_pdf,
    make_mixed_pdf,
    make_png_of_page,
    make_scanned_pdf,
    make_text_pdf_pages,
)

from contracts import events, media, routing
from contracts.errors import Permanent, Transient
from contracts.messages import DocumentParsed, DocumentUploaded, ParsedDocument
from contracts.pipeline import default_pipeline
from contracts.settings import Settings
from gateway.store.states import JobState, fold
from stages.builtin import parse

ENVELOPE = {"job_id": "j1", "document_id": "d1", "collection": "default", "filename": "f"}
PAGES = [
    "The orange heron nests on the first page of this scanned report.",
    "Copper kettles whistle loudly on the second page of the scan.",
    "Seven lighthouse keepers wrote letters on the third page.",
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, ocr_pages_per_range=2)


@pytest.fixture
async def ctx(settings: Settings) -> AsyncIterator[parse.ParseContext]:
    context = await parse.startup(settings)
    yield context
    await parse.STAGE.shutdown(context)


async def split(msg: DocumentUploaded, ctx: parse.ParseContext) -> list[DocumentUploaded]:
    """The page ranges the parse of `msg` sends back to the parse queue."""
    ranges = await parse.handle(msg, ctx)
    assert all(isinstance(r, DocumentUploaded) and r.ocr_range for r in ranges), ranges
    return [r for r in ranges if isinstance(r, DocumentUploaded)]


async def handed_on(msg: DocumentUploaded, ctx: parse.ParseContext) -> DocumentParsed:
    """The parsed document a range's parse hands on to chunk."""
    (out,) = await parse.handle(msg, ctx)
    assert isinstance(out, DocumentParsed), out
    return out


def upload(ctx: parse.ParseContext, data: bytes, content_type: str) -> DocumentUploaded:
    """The message of an upload whose bytes are in the blob store."""
    sha = ctx.blobs.put_bytes(data)
    return DocumentUploaded(
        **ENVELOPE, blob_sha256=sha, content_type=content_type, size_bytes=len(data)
    )


def ctx_settings_dir(ctx: parse.ParseContext) -> Path:
    """Where the context's local blob store keeps its files."""
    root: Path = ctx.blobs._root  # type: ignore[attr-defined]
    return root


def document(ctx: parse.ParseContext, out: DocumentParsed) -> ParsedDocument:
    return ParsedDocument.model_validate_json(ctx.blobs.read_bytes(out.parsed_sha256))


async def test_a_scan_goes_back_to_the_parse_queue_in_ranges_and_the_last_puts_it_together(
    ctx: parse.ParseContext,
) -> None:
    msg = upload(ctx, make_scanned_pdf(make_text_pdf_pages(PAGES)), media.PDF)
    ranges = await split(msg, ctx)
    assert [r.ocr_range and (r.ocr_range.index, r.ocr_range.pages) for r in ranges] == [
        (0, [1, 2]),
        (1, [3]),
    ]
    pipeline = default_pipeline()
    # They go to the parse queue again, not on to chunk.
    assert {pipeline.key_of_output("parse", r) for r in ranges} == {routing.DOC_UPLOADED}
    # Read in either order, by any worker: the one that finds the set complete hands it on.
    assert await parse.handle(ranges[1], ctx) == []
    out = await handed_on(ranges[0], ctx)
    assert out.pages == 3
    assert pipeline.key_of_output("parse", out) == routing.DOC_PARSED
    sections = document(ctx, out).sections
    assert [s.page for s in sections] == [1, 2, 3]
    assert "heron" in sections[0].text and "lighthouse" in sections[2].text
    # A range redelivered after the hand-on (a crash before its ack) hands on the same.
    assert await handed_on(ranges[1], ctx) == out


async def test_a_mixed_pdf_sends_only_its_scanned_pages_to_ocr(ctx: parse.ParseContext) -> None:
    msg = upload(ctx, make_mixed_pdf(PAGES, scanned={2}), media.PDF)
    (only,) = await split(msg, ctx)
    assert only.ocr_range is not None
    assert only.ocr_range.pages == [2] and only.ocr_range.text_layer
    sections = document(ctx, await handed_on(only, ctx)).sections
    assert [s.page for s in sections] == [1, 2, 3]
    # What the ranges kept on the way is gone once the whole is stored; only the note that
    # points at the whole stays, for a range that comes back (deleted with the document).
    notes = sorted(p.name for p in (ctx_settings_dir(ctx) / "notes").iterdir())
    assert len(notes) == 1 and notes[0].endswith("-whole"), notes
    # The text layer's pages are taken as they are, word for word.
    assert [" ".join(sections[i].text.split()) for i in (0, 2)] == [PAGES[0], PAGES[2]]
    assert "kettles" in sections[1].text.lower()


async def test_an_image_is_one_page_to_read(ctx: parse.ParseContext) -> None:
    msg = upload(ctx, make_png_of_page(make_text_pdf_pages(PAGES), 3), media.PNG)
    (only,) = await split(msg, ctx)
    out = await handed_on(only, ctx)
    assert out.pages == 1
    assert "lighthouse" in document(ctx, out).sections[0].text.lower()


async def test_a_scan_of_drawings_has_no_text(ctx: parse.ParseContext) -> None:
    (only,) = await split(upload(ctx, make_image_only_pdf(), media.PDF), ctx)
    with pytest.raises(Permanent) as raised:
        await parse.handle(only, ctx)
    assert raised.value.code == "no_text"


async def test_with_ocr_off_a_scan_has_no_text_as_before(tmp_path: Path) -> None:
    context = await parse.startup(Settings(data_dir=tmp_path, ocr=False))
    try:
        assert context.ocr is None
        with pytest.raises(Permanent) as raised:
            await parse.handle(
                upload(context, make_scanned_pdf(make_text_pdf_pages(PAGES)), media.PDF), context
            )
        assert raised.value.code == "no_text"
    finally:
        await parse.STAGE.shutdown(context)


async def test_parse_of_a_scan_ends_only_when_every_range_is_read(
    ctx: parse.ParseContext,
) -> None:
    pipeline = default_pipeline()
    msg = upload(ctx, make_scanned_pdf(make_text_pdf_pages(PAGES)), media.PDF)
    ranges = await split(msg, ctx)
    event = events.progress("parse", msg, ranges, 1)
    assert (event.batch_index, event.batch_count, event.pages) == (0, 3, 3)
    state = fold(JobState(), event, new_unit=True, pipeline=pipeline)
    assert state.status == "parsing" and state.stages["parse"].chunks == 0
    first = events.progress("parse", ranges[0], [], 1)
    state = fold(state, first, new_unit=True, pipeline=pipeline)
    assert state.status == "parsing" and state.stages["parse"].chunks == 2
    # The second range is read first: the first one's text is not there yet.
    assert await parse.handle(ranges[1], ctx) == []
    out = await handed_on(ranges[0], ctx)
    last = events.progress("parse", ranges[1], [out], 1)
    state = fold(state, last, new_unit=True, pipeline=pipeline)
    # Every page read, and parse done: the job waits for chunk.
    assert state.stages["parse"].chunks == 3 and state.pages == 3
    assert state.status == "chunking"
    assert state.stages["parse"].finished_at is not None
    assert state.stages["parse"].finished_at <= datetime.now(UTC)


async def test_a_worker_with_ocr_off_hands_on_no_document_missing_pages(
    ctx: parse.ParseContext, settings: Settings
) -> None:
    (only,) = await split(upload(ctx, make_mixed_pdf(PAGES, scanned={2}), media.PDF), ctx)
    # Another parse worker, of the same deployment, with OCR off.
    off = await parse.startup(settings.model_copy(update={"ocr": False}))
    try:
        with pytest.raises(Transient) as raised:
            await parse.handle(only, off)
        assert raised.value.code == "ocr_disabled"
    finally:
        await parse.STAGE.shutdown(off)
    # The range is still there for a worker that reads it.
    assert [s.page for s in document(ctx, await handed_on(only, ctx)).sections] == [1, 2, 3]
