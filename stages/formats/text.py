"""Plain text and Markdown: decode the bytes, then split Markdown at its ATX headings."""

from __future__ import annotations

import pathlib
import re

from contracts import media
from contracts.errors import Permanent
from contracts.messages import Section
from stages.formats.encoding import decode_text, normalise_newlines
from stages.formats.limits import DEFAULT_LIMITS, Limits, text_too_long

# No encoding spends more than four bytes on a character (UTF-8, UTF-32).
_MAX_BYTES_PER_CHAR = 4

_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")


def read_text(path: pathlib.Path, content_type: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """The file's text with `\\n` line ends; `Permanent` if not text or too long."""
    name = media.NAMES[content_type]
    size = path.stat().st_size
    if size > _MAX_BYTES_PER_CHAR * limits.max_text_chars:
        # Too long in any encoding: no need to decode it to know.
        raise text_too_long(name, size // _MAX_BYTES_PER_CHAR, limits.max_text_chars)
    text = decode_text(path.read_bytes())
    if text is None:
        raise Permanent(
            f"The file was declared a {name} but its bytes are not text "
            f"in any known encoding; save it as UTF-8 or upload {media.SUPPORTED_NAMES}.",
            code="unsupported_media_type",
        )
    text = normalise_newlines(text)
    if len(text) > limits.max_text_chars:
        raise text_too_long(name, len(text), limits.max_text_chars)
    return text


def parse_text(path: pathlib.Path, limits: Limits = DEFAULT_LIMITS) -> list[Section]:
    """Plain text as one section: the chunker splits it, and it has no headings to keep."""
    return [Section(text=read_text(path, media.TEXT, limits).strip())]


def parse_markdown(path: pathlib.Path, limits: Limits = DEFAULT_LIMITS) -> list[Section]:
    """Markdown as one section per ATX heading (markup kept), headings as metadata."""
    return split_markdown(read_text(path, media.MARKDOWN, limits))


def split_markdown(text: str) -> list[Section]:
    """Sections of Markdown `text`, cut before each ATX heading outside fenced code."""
    sections: list[Section] = []
    heading: str | None = None
    lines: list[str] = []
    fence: str | None = None

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(text=body, heading=heading))

    for line in text.split("\n"):
        opened = _FENCE.match(line)
        if fence is not None:
            # Only a fence of the same kind and at least the same length closes the block.
            if opened and opened["fence"][0] == fence[0] and len(opened["fence"]) >= len(fence):
                fence = None
        elif opened:
            fence = opened["fence"]
        elif match := _ATX_HEADING.match(line):
            flush()
            heading, lines = (match["text"] or "").strip() or None, []
        lines.append(line)
    flush()
    return sections
