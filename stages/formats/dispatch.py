"""Parsing a stored file into a `ParsedDocument`, dispatched on its (sniffed) content type."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from contracts import media
from contracts.errors import Permanent
from contracts.messages import ParsedDocument, Section
from stages.formats.docx import parse_docx
from stages.formats.html import parse_html
from stages.formats.limits import DEFAULT_LIMITS, Limits, text_too_long
from stages.formats.pdf import parse_pdf
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
    sections = [section for section in sections if section.text.strip()]
    if not sections:
        raise Permanent(
            f"The {media.NAMES[content_type]} contains no text to index; check that the right "
            "file was uploaded.",
            code="no_text",
        )
    # Parsers stop early where they can; this catches any that could not (HTML, Markdown).
    chars = sum(len(section.text) for section in sections)
    if chars > limits.max_text_chars:
        raise text_too_long(media.NAMES[content_type], chars, limits.max_text_chars)
    return ParsedDocument(content_type=content_type, pages=pages, sections=sections)
