"""Word (.docx) body text with python-docx: paragraphs and table rows in document order."""

from __future__ import annotations

import pathlib
import zipfile
from collections.abc import Iterator

import docx
from docx.table import Table
from docx.text.paragraph import Paragraph

from contracts.errors import Permanent
from contracts.messages import Section
from stages.formats.limits import DEFAULT_LIMITS, Limits, TextBudget

_HEADING_STYLES = ("Heading", "Title")
# Word files hold tens to a few thousand parts (media included); far more is a crafted archive.
_MAX_PARTS = 10_000
# XML deflates about 5-30:1; DEFLATE cannot beat ~1032:1. A large part near that is a bomb.
_MAX_RATIO = 200
_RATIO_FLOOR_BYTES = 1024 * 1024


def parse_docx(path: pathlib.Path, limits: Limits = DEFAULT_LIMITS) -> list[Section]:
    """One section per heading-led block of the body (headings as metadata); `Permanent` if bad."""
    try:
        check_archive(path, limits)
        return _sections(path, TextBudget(limits, "Word document"))
    except (OSError, Permanent):
        # OSError: the blob store lost the file; not the uploader's fault, let the runtime retry.
        raise
    except Exception as exc:
        # python-docx surfaces bad input as zip, XML, KeyError or ValueError failures alike.
        raise Permanent(
            f"The Word document could not be read ({type(exc).__name__}); it may be damaged, "
            "or a .doc/.docm file saved under a .docx name. Save it again as .docx in Word or "
            "LibreOffice and upload it again.",
            code="unreadable_docx",
        ) from exc


def check_archive(path: pathlib.Path, limits: Limits) -> None:
    """`Permanent` `docx_too_large` for a zip bomb, read from the central directory alone.

    python-docx inflates every part into memory when it opens a file, so this runs first.
    """
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
    if len(entries) > _MAX_PARTS:
        raise _too_large(
            f"has {len(entries):,} parts inside; Word documents have at most a few thousand"
        )
    total = sum(entry.file_size for entry in entries)
    if total > limits.max_docx_uncompressed_bytes:
        raise _too_large(
            f"unpacks to {total:,} bytes; the limit is {limits.max_docx_uncompressed_bytes:,} "
            "(SLUICE_MAX_DOCX_UNCOMPRESSED_BYTES)"
        )
    for entry in entries:
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size > _RATIO_FLOOR_BYTES and ratio > _MAX_RATIO:
            raise _too_large(
                f"has a part ({entry.filename}) compressed {ratio:,.0f}:1, which only a zip bomb "
                "does"
            )


def _too_large(detail: str) -> Permanent:
    return Permanent(
        f"The Word document {detail}. Remove embedded files or split the document, save it "
        "again and upload it again.",
        code="docx_too_large",
    )


def _sections(path: pathlib.Path, budget: TextBudget) -> list[Section]:
    document = docx.Document(str(path))
    sections: list[Section] = []
    heading: str | None = None
    blocks: list[str] = []
    headings: dict[str | None, bool] = {}

    def flush() -> None:
        text = "\n\n".join(blocks).strip()
        if text:
            sections.append(Section(text=text, heading=heading))

    for item in document.iter_inner_content():
        if isinstance(item, Table):
            rows = "\n".join(_table_rows(item))
            budget.spend(rows)
            blocks.append(rows)
            continue
        text = item.text.strip()
        if not text:
            continue
        budget.spend(text)
        if _is_heading(item, headings):
            flush()
            heading, blocks = text, []
        blocks.append(text)
    flush()
    return sections


def _is_heading(paragraph: Paragraph, known: dict[str | None, bool]) -> bool:
    """Whether the paragraph's style is a heading's; `known` holds the answer per style id, as
    python-docx looks each paragraph's style up among all the document's styles (a third of
    the time the benchmark's Word files took to read)."""
    style_id = paragraph._p.style
    if style_id not in known:
        style = paragraph.style
        name = style.name if style is not None else None
        known[style_id] = bool(name) and str(name).startswith(_HEADING_STYLES)
    return known[style_id]


def _table_rows(table: Table) -> Iterator[str]:
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            # A merged cell is returned once per grid column it spans; keep it once.
            if cell._tc is previous:
                continue
            previous = cell._tc
            cells.append(" ".join(cell.text.split()))
        if any(cells):
            yield " | ".join(cells)
