"""PDF text per page with pypdfium2, page numbers kept."""

from __future__ import annotations

import pathlib
import re
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from contracts.errors import Permanent
from contracts.messages import Section
from stages.formats.encoding import normalise_newlines
from stages.formats.limits import DEFAULT_LIMITS, Limits, TextBudget

# PDFium is not thread-safe; callers may run parsers in threads (the stage uses processes).
PDFIUM_LOCK = threading.Lock()
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ufffe\uffff]")
_PASSWORD_ERRORS = frozenset({pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY})


# A page whose text layer has fewer characters than this has none worth using (a scan may
# carry a stray page number or a watermark): with OCR on, it is read from its image.
MIN_TEXT_LAYER_CHARS = 3


def parse_pdf(path: pathlib.Path, limits: Limits = DEFAULT_LIMITS) -> tuple[int, list[Section]]:
    """(page count, one section per page that has text); `Permanent` for bad or too big PDFs."""
    page_count, kept, _ = read_text_layer(path, limits)
    if not kept:
        raise Permanent(
            f"The PDF has {page_count} page(s) but no extractable text, so it is probably a "
            "scanned image; turn OCR on (SLUICE_OCR=true) or run it through OCR (e.g. "
            "ocrmypdf), and upload it again.",
            code="no_text",
        )
    return page_count, kept


def read_text_layer(
    path: pathlib.Path, limits: Limits = DEFAULT_LIMITS
) -> tuple[int, list[Section], list[int]]:
    """(page count, the sections of pages with text, the 1-based pages without a usable text
    layer); `Permanent` for bad or too big PDFs."""
    with PDFIUM_LOCK:
        document = open_pdf(path)
        try:
            page_count = len(document)
            _check_pages(page_count, limits)
            budget = TextBudget(limits, "PDF")
            sections = []
            for index in range(page_count):
                section = _page_section(document, index)
                # Stop at the page that passes the limit instead of extracting the rest.
                budget.spend(section.text, f"by page {index + 1:,} of {page_count:,}")
                sections.append(section)
        finally:
            document.close()
    kept = [section for section in sections if section.text.strip()]
    blank = [s.page or 0 for s in sections if len(s.text.strip()) < MIN_TEXT_LAYER_CHARS]
    return page_count, kept, blank


def _check_pages(page_count: int, limits: Limits) -> None:
    if page_count > limits.max_pdf_pages:
        raise Permanent(
            f"The PDF has {page_count:,} pages; the limit is {limits.max_pdf_pages:,} "
            "(SLUICE_MAX_PDF_PAGES). Split it and upload the parts.",
            code="too_many_pages",
        )


def open_pdf(path: pathlib.Path) -> pdfium.PdfDocument:
    """The PDF at `path`, opened; `Permanent` for an encrypted or unreadable one (callers hold
    `PDFIUM_LOCK`)."""
    try:
        return pdfium.PdfDocument(path)
    except pdfium.PdfiumError as exc:
        if exc.err_code in _PASSWORD_ERRORS:
            raise Permanent(
                "The PDF is password-protected; upload a decrypted copy.", code="encrypted_pdf"
            ) from exc
        raise Permanent(
            f"The PDF could not be read ({str(exc).rstrip('.')}); it may be damaged or truncated. "
            "Re-export or re-download it and upload it again.",
            code="unreadable_pdf",
        ) from exc


def _page_section(document: pdfium.PdfDocument, index: int) -> Section:
    try:
        page = document[index]
        try:
            textpage = page.get_textpage()
            try:
                text: str = textpage.get_text_bounded()
            finally:
                textpage.close()
        finally:
            page.close()
    except pdfium.PdfiumError as exc:
        raise damaged_page(index + 1, "read", exc) from exc
    return Section(text=clean_text(text), page=index + 1)


def damaged_page(page: int, doing: str, exc: pdfium.PdfiumError) -> Permanent:
    """The error of a PDF page PDFium could not be `doing` ("read", "rendered for OCR")."""
    return Permanent(
        f"Page {page} of the PDF could not be {doing} ({str(exc).rstrip('.')}); the file may "
        "be damaged. Re-export it and upload it again.",
        code="unreadable_pdf",
    )


def clean_text(text: str) -> str:
    """Text as Sluice stores it: newlines normalised, stray control characters and trailing
    spaces gone."""
    # Text layers carry stray control characters that only add noise to embeddings.
    text = _CONTROL.sub("", normalise_newlines(text))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()
