"""Parse: sniffed bytes → text sections with page numbers, stored in the blob store.

Pages without a text layer (a scan, an image) are read with OCR, spread over the parse
workers: the parse of such a document sends its pages back to the parse queue in ranges of
`SLUICE_OCR_PAGES_PER_RANGE` (`PageRange`), so whichever workers are free read them at once.
A worker renders, reads and releases one page at a time in an OCR sandbox, with a time and a
memory limit per page, so memory stays flat whatever the page count. Each range's text is a
note in the blob store; the worker that finds every range's note there puts the document
together and hands it on, as if one parse had read it all.

The notes are named after the job, so deleting the document removes them (and what a failed
job left). Every step survives a crash: a range read twice writes the same note, two workers
that both find the last note there both hand on the same document (the chunk stage's ids make
that harmless), and the note of the whole document is written before the ranges' notes go,
so a range that comes back after that finds the document already put together.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter

from contracts import pipeline
from contracts.errors import SluiceError, Transient
from contracts.messages import DocumentParsed, DocumentUploaded, PageRange, ParsedDocument, Section
from contracts.settings import Settings
from stages.backends.factory import open_blob_store
from stages.backends.protocols import BlobStore
from stages.formats import FirstRead, Limits, first_read, whole_document
from stages.formats.ocr import engine_available, ocr_page
from stages.infra.stage_metrics import OCR_PAGES
from stages.kit.deletions import Deletions
from stages.kit.sandbox import Sandbox
from stages.stage import Stage

_SECTIONS = TypeAdapter(list[Section])
# OCR reads a stray mark or two on a page of drawings; a page with fewer letters and digits
# than this has no text to index.
_LEGIBLE_CHARS = 3


@dataclass(frozen=True)
class ParseContext:
    """What the parse stage needs: the blob store, its limits, worker processes to parse and
    to read pages with OCR in, and how to tell that a document was deleted."""

    blobs: BlobStore
    limits: Limits
    sandbox: Sandbox
    deletions: Deletions
    # None while OCR is off (`SLUICE_OCR`).
    ocr: Sandbox | None
    ocr_engine: str
    pages_per_range: int


async def startup(settings: Settings) -> ParseContext:
    """Open the blob store and start one parse worker (and one OCR worker) per concurrent
    message."""
    workers = settings.stage("parse").concurrency
    sandbox = Sandbox(
        workers,
        timeout_s=settings.parse_timeout_s,
        memory_mb=settings.parse_memory_mb,
        recycle_mb=settings.parse_worker_recycle_mb,
        preload=["stages.formats"],
    )
    ocr = None
    if settings.ocr:
        missing = engine_available(settings.ocr_engine)
        if missing is not None:
            raise SluiceError(
                f"SLUICE_OCR_ENGINE={settings.ocr_engine} cannot run here: {missing} "
                "(or set SLUICE_OCR=false to leave scans and images out)",
                code="usage_error",
            )
        ocr = Sandbox(
            workers,
            timeout_s=settings.ocr_page_timeout_s,
            memory_mb=settings.ocr_page_memory_mb,
            recycle_mb=settings.ocr_page_memory_mb // 2,
            preload=["stages.formats.ocr"],
            work="Reading one page with OCR",
            timeout_setting="SLUICE_OCR_PAGE_TIMEOUT_S",
            memory_setting="SLUICE_OCR_PAGE_MEMORY_MB",
        )
    await sandbox.start()
    if ocr is not None:
        try:
            await ocr.start()
        except BaseException:
            await sandbox.close()
            raise
    return ParseContext(
        blobs=open_blob_store(settings),
        limits=Limits.from_settings(settings),
        sandbox=sandbox,
        deletions=Deletions(settings),
        ocr=ocr,
        ocr_engine=settings.ocr_engine,
        pages_per_range=settings.ocr_pages_per_range,
    )


async def handle(
    msg: DocumentUploaded, ctx: ParseContext
) -> list[DocumentParsed | DocumentUploaded]:
    """Extract the text of an upload, or of one range of its pages with OCR; a bad, too big or
    too slow file fails the job, and one deleted before its turn (its upload gone with it) is
    dropped."""
    try:
        if msg.ocr_range is not None:
            return await _read_range(msg, msg.ocr_range, ctx)
        with ctx.blobs.as_file(msg.blob_sha256) as source:
            found = await ctx.sandbox.run(
                first_read, source, msg.content_type, ctx.limits, ctx.ocr is not None
            )
    except Transient as exc:
        if await ctx.deletions.explains(msg, exc):
            return []
        raise
    if not found.to_read:
        assert found.text is not None, "a first read with nothing left to read has the text"
        return [_parsed(msg, ctx.blobs, found.text)]
    return _ranges(msg, found, ctx)


def _ranges(
    msg: DocumentUploaded, found: FirstRead, ctx: ParseContext
) -> list[DocumentParsed | DocumentUploaded]:
    """The pages still to read, as ranges for the parse queue (the text found so far stored)."""
    if found.text is not None:
        ctx.blobs.put_note(_text_note(msg), found.text.model_dump_json().encode())
    step = ctx.pages_per_range
    pages = found.to_read
    total = found.pages or len(pages)
    count = -(-len(pages) // step)
    return [
        msg.model_copy(
            update={
                "ocr_range": PageRange(
                    index=i,
                    count=count,
                    pages=list(pages[i * step : (i + 1) * step]),
                    pages_total=total,
                    text_layer=found.text is not None,
                )
            }
        )
        for i in range(count)
    ]


async def _read_range(
    msg: DocumentUploaded, pages: PageRange, ctx: ParseContext
) -> list[DocumentParsed | DocumentUploaded]:
    """Read one range of pages with OCR; the worker that completes the set hands on the whole."""
    already = ctx.blobs.read_note(_whole_note(msg))
    if already is not None:
        return [_handed_on(msg, already.decode(), pages.pages_total)]
    if ctx.ocr is None:
        # A worker with OCR off (a fleet half upgraded, or OCR turned off while ranges
        # waited) must not hand on a document without these pages: another worker may read
        # them, or a person turns OCR back on and retries the job.
        raise Transient(
            f"Pages {pages.pages[0]}-{pages.pages[-1]} of this document need OCR, which is off "
            "on this parse worker (SLUICE_OCR=false); turn it on and retry the job.",
            code="ocr_disabled",
        )
    sections: list[Section] = []
    with ctx.blobs.as_file(msg.blob_sha256) as source:
        for page in pages.pages:
            text = await ctx.ocr.run(ocr_page, source, msg.content_type, page, ctx.ocr_engine)
            OCR_PAGES.labels(ctx.ocr_engine).inc()
            if sum(c.isalnum() for c in text) >= _LEGIBLE_CHARS:
                sections.append(Section(text=text, page=page))
    ctx.blobs.put_note(_range_note(msg, pages.index, pages.count), _SECTIONS.dump_json(sections))
    ranges = [ctx.blobs.read_note(_range_note(msg, i, pages.count)) for i in range(pages.count)]
    if any(r is None for r in ranges):
        return []
    found = [section for r in ranges if r is not None for section in _SECTIONS.validate_json(r)]
    if pages.text_layer:
        layer = ctx.blobs.read_note(_text_note(msg))
        if layer is None:
            raise Transient(
                f"the text layer of {msg.filename!r} is not in the blob store (yet)",
                code="blob_missing",
            )
        found.extend(ParsedDocument.model_validate_json(layer).sections)
    found.sort(key=lambda s: s.page or 0)
    whole = whole_document(
        msg.content_type, pages.pages_total, found, ctx.limits, read_with_ocr=True
    )
    parsed = _parsed(msg, ctx.blobs, whole)
    # The whole before its parts go: a range that comes back later finds the whole.
    ctx.blobs.put_note(_whole_note(msg), parsed.parsed_sha256.encode())
    for i in range(pages.count):
        ctx.blobs.delete_note(_range_note(msg, i, pages.count))
    ctx.blobs.delete_note(_text_note(msg))
    return [parsed]


def _parsed(msg: DocumentUploaded, blobs: BlobStore, document: ParsedDocument) -> DocumentParsed:
    """`document` stored, and handed on."""
    parsed_sha256 = blobs.put_bytes(document.model_dump_json().encode())
    return _handed_on(msg, parsed_sha256, document.pages)


def _handed_on(msg: DocumentUploaded, parsed_sha256: str, pages: int | None) -> DocumentParsed:
    return DocumentParsed(
        **msg.envelope(), blob_sha256=msg.blob_sha256, parsed_sha256=parsed_sha256, pages=pages
    )


def _range_note(msg: DocumentUploaded, index: int, count: int) -> str:
    return f"ocr-{msg.job_id}-{msg.blob_sha256[:16]}-{index}-of-{count}"


def _text_note(msg: DocumentUploaded) -> str:
    return f"ocr-{msg.job_id}-{msg.blob_sha256[:16]}-text"


def _whole_note(msg: DocumentUploaded) -> str:
    return f"ocr-{msg.job_id}-{msg.blob_sha256[:16]}-whole"


async def shutdown(ctx: ParseContext) -> None:
    """Stop the parse and OCR workers."""
    await ctx.sandbox.close()
    if ctx.ocr is not None:
        await ctx.ocr.close()


STAGE = Stage(spec=pipeline.PARSE, startup=startup, handle=handle, shutdown=shutdown)
