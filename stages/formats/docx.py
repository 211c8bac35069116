"""Word (.docx) body text with python-docx: paragraphs and table rows in document order."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import docx
from docx.table import Table
from docx.text.paragraph import Paragraph

from contracts.errors import Permanent
from contracts.messages import Section

_HEADING_STYLES = ("Heading", "Title")


def parse_docx(path: pathlib.Path) -> list[Section]:
    """One section per heading-led block of the body (headings as metadata); `Permanent` if bad."""
    try:
        return _sections(path)
    except OSError:
        raise  # the blob store lost the file: not the uploader's fault, let the runtime retry
    except Exception as exc:
        # python-docx surfaces bad input as zip, XML, KeyError or ValueError failures alike.
        raise Permanent(
            f"The Word document could not be read ({type(exc).__name__}); it may be damaged, "
            "or a .doc/.docm file saved under a .docx name. Save it again as .docx in Word or "
            "LibreOffice and upload it again.",
            code="unreadable_docx",
        ) from exc


def _sections(path: pathlib.Path) -> list[Section]:
    document = docx.Document(str(path))
    sections: list[Section] = []
    heading: str | None = None
    blocks: list[str] = []

    def flush() -> None:
        text = "\n\n".join(blocks).strip()
        if text:
            sections.append(Section(text=text, heading=heading))

    for item in document.iter_inner_content():
        if isinstance(item, Table):
            blocks.append("\n".join(_table_rows(item)))
            continue
        text = item.text.strip()
        if not text:
            continue
        if _is_heading(item):
            flush()
            heading, blocks = text, []
        blocks.append(text)
    flush()
    return sections


def _is_heading(paragraph: Paragraph) -> bool:
    style = paragraph.style
    name = style.name if style is not None else None
    return bool(name) and str(name).startswith(_HEADING_STYLES)


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
