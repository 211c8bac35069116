"""Parsing a stored file into a `ParsedDocument`, dispatched on its (sniffed) content type."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from contracts import media
from contracts.errors import Permanent
from contracts.messages import ParsedDocument, Section
from stages.formats.docx import parse_docx
from stages.formats.html import parse_html
from stages.formats.limits import DEFAULT_LIMITS, Limits, text_too_long
from stages.formats.pdf import parse_pdf, read_text_layer
from stages.formats.text import parse_markdown, parse_text

_PARSERS: dict[str, Callable[[pathlib.Path, Limits], list[Section]]] = {
    media.DOCX: parse_docx,
    media.HTML: parse_html,
    media.MARKDOWN: parse_markdown,
    media.TEXT: parse_text,
}


def parse_document(
    path: pathlib.Path, content_type: str, limits: Limits = DEFAULT_LIMITS
) -> ParsedDocument:
    """The text sections of the file at `path`; `Permanent` if it has none or is too big."""
    pages: int | None = None
    if content_type == media.PDF:
        pages, sections = parse_pdf(path, limits)
    elif content_type in _PARSERS:
        sections = _PARSERS[content_type](path, limits)
    else:
        raise Permanent(
            f"Content type {content_type!r} is not supported; upload {media.SUPPORTED_NAMES}.",
            code="unsupported_media_type",
        )
    return whole_document(content_type, pages, sections, limits)


def whole_document(
    content_type: str,
    pages: int | None,
    sections: list[Section],
    limits: Limits,
    *,
    read_with_ocr: bool = False,
) -> ParsedDocument:
    """The document of these sections, or `Permanent` when it has no text or too much."""
    sections = [section for section in sections if section.text.strip()]
    if not sections:
        where = " (OCR found no legible text on its pages)" if read_with_ocr else ""
        raise Permanent(
            f"The {media.NAMES[content_type]} contains no text to index{where}; check that the "
            "right file was uploaded" + (" and that it is legible." if read_with_ocr else "."),
            code="no_text",
        )
    # Parsers stop early where they can; this catches any that could not (HTML, Markdown).
    chars = sum(len(section.text) for section in sections)
    if chars > limits.max_text_chars:
        raise text_too_long(media.NAMES[content_type], chars, limits.max_text_chars)
    return ParsedDocument(content_type=content_type, pages=pages, sections=sections)


@dataclass(frozen=True)
class FirstRead:
    """What parsing finds before any OCR: the text it could read, and the pages still to read
    from their images (none: `text` is the whole document)."""

    text: ParsedDocument | None
    to_read: tuple[int, ...] = ()
    pages: int | None = None


def first_read(
    path: pathlib.Path, content_type: str, limits: Limits = DEFAULT_LIMITS, ocr: bool = True
) -> FirstRead:
    """Parse what has text; with `ocr`, also name the pages of a scan or an image to read."""
    if ocr and content_type in media.IMAGES:
        from stages.formats.ocr import image_page_count

        count = image_page_count(path, content_type)
        if count > limits.max_pdf_pages:
            raise Permanent(
                f"The image has {count:,} pages; the limit is {limits.max_pdf_pages:,} "
                "(SLUICE_MAX_PDF_PAGES). Split it and upload the parts.",
                code="too_many_pages",
            )
        return FirstRead(None, tuple(range(1, count + 1)), count)
    if not (ocr and content_type == media.PDF):
        return FirstRead(parse_document(path, content_type, limits))
    pages, sections, blank = read_text_layer(path, limits)
    if not blank:
        return FirstRead(whole_document(content_type, pages, sections, limits), (), pages)
    # A page read with OCR is read only that way: its few characters of text layer go.
    ocr_pages = set(blank)
    kept = [s for s in sections if s.page not in ocr_pages]
    text = ParsedDocument(content_type=content_type, pages=pages, sections=kept) if kept else None
    return FirstRead(text, tuple(blank), pages)
