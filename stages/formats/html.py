"""HTML main text: trafilatura first, else a selectolax reading of <main>/<article>/<body>."""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any

from selectolax.lexbor import LexborHTMLParser, LexborNode

from contracts import media
from contracts.errors import Permanent
from contracts.messages import Section
from stages.formats.encoding import bom_encoding, decode_text, normalise_newlines
from stages.formats.limits import DEFAULT_LIMITS, Limits
from stages.formats.text import split_markdown

log = logging.getLogger(__name__)

try:
    import trafilatura

    _trafilatura: Any = trafilatura
except ImportError:  # pragma: no cover - depends on the environment
    # trafilatura needs lxml's html cleaner (package lxml_html_clean); without it we still
    # have the selectolax reading below, which is cruder on pages without <main>/<article>.
    log.warning("trafilatura is unavailable; HTML is parsed with the selectolax fallback")
    _trafilatura = None

_META_CHARSET = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE
)
_META_WINDOW_BYTES = 4 * 1024
_BOILERPLATE = "nav, header, footer, aside, script, style, noscript, template, form, iframe, svg"
_BLOCKS = (
    "p, div, section, li, tr, pre, blockquote, table, ul, ol, dl, dt, dd, br, "
    "h4, h5, h6, figcaption, article, main"
)
_HEADINGS = {"h1": "#", "h2": "##", "h3": "###"}
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*")


def parse_html(path: pathlib.Path, limits: Limits = DEFAULT_LIMITS) -> list[Section]:
    """Sections of the page's main text, cut at h1-h3 headings (kept as metadata)."""
    # HTML parsers build a tree many times the page's size: refuse before reading it.
    size = path.stat().st_size
    if size > limits.max_html_bytes:
        raise Permanent(
            f"The HTML page is {size:,} bytes; the limit is {limits.max_html_bytes:,} "
            "(SLUICE_MAX_HTML_BYTES). Save its main text as a PDF or text file and upload that.",
            code="html_too_large",
        )
    markup = decode_html(path.read_bytes())
    markdown = _with_trafilatura(markup) or _with_selectolax(markup)
    return split_markdown(markdown)


def decode_html(data: bytes) -> str:
    """The page as text, honouring a BOM, then `<meta charset>`, then the bytes themselves."""
    declared = None if bom_encoding(data) else _declared_charset(data[:_META_WINDOW_BYTES])
    text = decode_text(data, declared=declared)
    if text is None:
        raise Permanent(
            "The file was declared an HTML page but its bytes are not text; "
            f"upload {media.SUPPORTED_NAMES}.",
            code="unsupported_media_type",
        )
    return normalise_newlines(text)


def _declared_charset(head: bytes) -> str | None:
    match = _META_CHARSET.search(head)
    if match is None:
        return None
    name = match.group(1).decode("ascii").lower()
    # Browsers read "iso-8859-1" and "ascii" as windows-1252 (WHATWG Encoding); so do we.
    if name in {"iso-8859-1", "latin1", "latin-1", "us-ascii", "ascii"}:
        return "cp1252"
    try:
        "".encode(name)
    except LookupError:
        return None  # an unknown label: fall back to sniffing the bytes
    return name


def _with_trafilatura(markup: str) -> str:
    if _trafilatura is None:
        return ""
    result = _trafilatura.extract(
        markup,
        output_format="markdown",
        favor_precision=True,  # on short pages recall mode keeps the nav and header
        include_comments=False,
        include_tables=True,
        include_images=False,
        include_links=False,
        deduplicate=False,
    )
    return result.strip() if isinstance(result, str) else ""


def _with_selectolax(markup: str) -> str:
    tree = LexborHTMLParser(markup)
    root = tree.css_first("main") or tree.css_first("article") or tree.body
    if root is None:
        return ""
    for node in root.css(_BOILERPLATE):
        node.decompose()
    for node in root.css(", ".join(_HEADINGS)):
        _replace_heading(node)
    # Block ends become line breaks so paragraphs do not run into each other.
    for node in root.css(_BLOCKS):
        node.insert_after("\n\n")
    text = root.text(deep=True, separator="", strip=False)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _replace_heading(node: LexborNode) -> None:
    title = " ".join(node.text(deep=True, separator=" ").split())
    if title:
        node.insert_before(f"\n\n{_HEADINGS[node.tag or 'h1']} {title}\n\n")
    node.decompose()
