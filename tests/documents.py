"""Builders of real documents (PDF, DOCX, HTML, Markdown, Latin-1 text, PNG) for tests."""

from __future__ import annotations

import html
import io
import random
import struct
import zipfile
import zlib
from datetime import UTC, datetime

from docx import Document
from fpdf import FPDF
from PIL import Image

_NAV_LINKS = [
    "Home",
    "Products",
    "Pricing",
    "About us",
    "Careers",
    "Contact sales",
    "Sign in",
]


def _new_pdf() -> FPDF:
    pdf = FPDF()
    # Fixed metadata keeps the bytes reproducible from run to run.
    pdf.set_creation_date(datetime(2024, 1, 1, tzinfo=UTC))
    pdf.set_font("Helvetica", size=12)
    return pdf


def make_pdf(pages: list[str]) -> bytes:
    """A real PDF with one page per string (latin-1 text, core font)."""
    pdf = _new_pdf()
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_image_only_pdf() -> bytes:
    """A valid one-page PDF holding only drawn shapes, like a scan without OCR."""
    pdf = _new_pdf()
    pdf.add_page()
    pdf.set_fill_color(40, 40, 40)
    pdf.rect(20, 20, 120, 60, style="F")
    pdf.ellipse(40, 100, 80, 50, style="F")
    return bytes(pdf.output())


def make_encrypted_pdf(text: str) -> bytes:
    """A PDF that needs a user password to open."""
    pdf = _new_pdf()
    pdf.set_encryption(owner_password="owner-secret", user_password="user-secret")
    pdf.add_page()
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_docx(paragraphs: list[str], table: list[list[str]], heading: str | None = None) -> bytes:
    """A real .docx: optional Heading 1, the paragraphs, then a table of the given rows."""
    doc = Document()
    if heading is not None:
        doc.add_heading(heading, level=1)
    for text in paragraphs:
        doc.add_paragraph(text)
    if table:
        width = max(len(row) for row in table)
        grid = doc.add_table(rows=len(table), cols=width)
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                grid.cell(r, c).text = cell
    buffer = io.BytesIO()
    doc.save(buffer)
    return buffer.getvalue()


def make_html(title: str, paragraphs: list[str]) -> bytes:
    """A web page: nav, header, footer and script boilerplate around a <main><article>."""
    nav = "".join(f'<li><a href="/{i}">{link}</a></li>' for i, link in enumerate(_NAV_LINKS))
    body = "\n".join(f"      <p>{html.escape(p)}</p>" for p in paragraphs)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <script>window.analyticsQueue = ["trackPageView"]; console.log("tracking pixel loaded");</script>
  <style>body {{ font-family: sans-serif; }}</style>
</head>
<body>
  <header><div class="brand">Acme Corporation Portal</div></header>
  <nav><ul>{nav}</ul></nav>
  <main>
    <article>
      <h1>{html.escape(title)}</h1>
{body}
    </article>
  </main>
  <footer><p>Copyright 2024 Acme Corporation. All rights reserved.</p>
    <a href="/privacy">Privacy policy</a> <a href="/terms">Terms of service</a></footer>
  <script>document.write("injected advertisement banner");</script>
</body>
</html>
"""
    return page.encode("utf-8")


def make_markdown(title: str, sections: dict[str, str]) -> bytes:
    """A Markdown document: a `# title` then one `## heading` per section."""
    parts = [f"# {title}\n"]
    for heading, text in sections.items():
        parts.append(f"## {heading}\n\n{text}\n")
    return "\n".join(parts).encode("utf-8")


def make_latin1_text(text: str) -> bytes:
    """Plain text encoded as Latin-1 (ISO-8859-1), not UTF-8."""
    return text.encode("latin-1")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_png() -> bytes:
    """A valid 2x2 RGB PNG written by hand."""
    width, height = 2, 2
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Each scanline starts with filter byte 0 (none).
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def make_gif() -> bytes:
    """A valid 1x1 GIF: an image type Sluice does not read, even with OCR on."""
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
        b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


# A mixed corpus: one document of every supported type, each with a sentence to search for.
PDF_PAGE_2 = "Arctic terns migrate from pole to pole every single year."
DOCX_SENTENCE = "The quarterly audit found that warehouse inventory was overstated."
DOCX_CELL = "Ferrous sulphate"
HTML_SENTENCE = "The Fresnel lens made lighthouse beams visible for many nautical miles."
MD_SENTENCE = "Sourdough needs a long cold fermentation to develop its flavour."
LATIN1_SENTENCE = "La crème brûlée du café Müller était délicieuse à Zürich."


def corpus() -> dict[str, bytes]:
    """One real document of every supported type, each with a sentence to search for."""
    return {
        "report.pdf": make_pdf(
            [
                "Page one introduces the annual report of the bird society.",
                PDF_PAGE_2,
                "Page three lists the members of the board and their duties.",
            ]
        ),
        "audit.docx": make_docx(
            ["Summary of findings.", DOCX_SENTENCE, "Management accepted every recommendation."],
            table=[["Item", "Count"], [DOCX_CELL, "120"], ["Zinc oxide", "75"]],
            heading="Audit 2026",
        ),
        "lighthouses.html": make_html(
            "Lighthouses",
            [
                "Lighthouses guided sailors along dangerous coasts for centuries.",
                HTML_SENTENCE,
                "Modern lighthouses are automated and rarely staffed by keepers.",
                "Several old towers have become museums, hotels and holiday homes.",
            ],
        ),
        "bread.md": make_markdown(
            "Baking",
            {
                "Starter": "Feed the starter twice a day with flour and water.",
                "Dough": MD_SENTENCE,
            },
        ),
        "cafe.txt": make_latin1_text(LATIN1_SENTENCE + "\nLe service était rapide."),
    }


def make_corrupt_pdf() -> bytes:
    """A file with a real PDF header and random bytes after it: sniffed as PDF, unreadable."""
    garbage = random.Random(1729).randbytes(8 * 1024)
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + garbage.replace(b"%%EOF", b"")


def make_many_page_pdf(pages: int) -> bytes:
    """A real PDF of `pages` short pages."""
    return make_pdf([f"Page {number} of the long report." for number in range(1, pages + 1)])


def make_docx_bomb(uncompressed_bytes: int) -> bytes:
    """A real .docx whose word/document.xml is padded with spaces to `uncompressed_bytes`.

    Spaces deflate about 1000:1, so the file stays small while python-docx, opening it, would
    inflate and parse the whole part.
    """
    main_part = "word/document.xml"
    source = zipfile.ZipFile(io.BytesIO(make_docx(["A harmless looking memo."], [])))
    buffer = io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb:
        for item in source.infolist():
            if item.filename != main_part:
                bomb.writestr(item, source.read(item.filename))
        head, end, tail = source.read(main_part).rpartition(b"</w:document>")
        block = b" " * (1 << 20)
        with bomb.open(main_part, "w", force_zip64=True) as part:
            part.write(head)
            # A block at a time, so the test never holds the inflated part in memory.
            left = uncompressed_bytes - len(head) - len(end) - len(tail)
            while left > 0:
                part.write(block[: min(left, len(block))])
                left -= len(block)
            part.write(end + tail)
    return buffer.getvalue()


# Scans and images for OCR: each page carries one sentence that only it has.
OCR_SENTENCES = (
    "The purple walrus sleeps on page one.",
    "A silver kettle whistles on page two.",
    "The orange heron nests on page three.",
    "Seven copper lanterns glow on page four.",
)
# What the scans are made at: small (A6) pages at this resolution keep OCR tests quick.
SCAN_DPI = 150
_A6_MM = (105, 148)


def make_text_pdf_pages(pages: list[str]) -> bytes:
    """A PDF of small (A6) pages in 14 pt text, one per string: quick to render and OCR."""
    pdf = FPDF(format=_A6_MM)
    pdf.set_creation_date(datetime(2024, 1, 1, tzinfo=UTC))
    pdf.set_font("Helvetica", size=14)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def render_pdf_pages(pdf: bytes, dpi: int) -> list[Image.Image]:
    """Every page of `pdf` rendered to a grey image at `dpi`."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(pdf)
    images = []
    try:
        for index in range(len(document)):
            page = document[index]
            bitmap = page.render(scale=dpi / 72, grayscale=True)
            # to_pil shares the bitmap's memory, which close() frees: keep a copy.
            images.append(bitmap.to_pil().copy())
            bitmap.close()
            page.close()
    finally:
        document.close()
    return images


def make_scanned_pdf(pdf: bytes) -> bytes:
    """An image-only PDF (no text layer) whose pages are pictures of `pdf`'s pages."""
    first, *rest = render_pdf_pages(pdf, SCAN_DPI)
    buffer = io.BytesIO()
    # At the resolution they were rendered at, the pages keep their size on paper.
    first.save(buffer, format="PDF", save_all=True, append_images=rest, resolution=SCAN_DPI)
    return buffer.getvalue()


def make_png_of_page(pdf: bytes, page: int) -> bytes:
    """A PNG picture of page `page` (1-based) of `pdf`."""
    buffer = io.BytesIO()
    render_pdf_pages(pdf, SCAN_DPI)[page - 1].save(buffer, format="PNG", dpi=(SCAN_DPI, SCAN_DPI))
    return buffer.getvalue()


def make_tiff_of_pages(pdf: bytes, *, bilevel: bool = False) -> bytes:
    """A multi-page TIFF of `pdf`'s pages: grey, or black and white in CCITT G4 like a fax."""
    images = render_pdf_pages(pdf, SCAN_DPI)
    if bilevel:
        images = [image.convert("1") for image in images]
    first, *rest = images
    buffer = io.BytesIO()
    first.save(
        buffer,
        format="TIFF",
        save_all=True,
        append_images=rest,
        compression="group4" if bilevel else "tiff_deflate",
        dpi=(SCAN_DPI, SCAN_DPI),
    )
    return buffer.getvalue()


def make_mixed_pdf(pages: list[str], scanned: set[int]) -> bytes:
    """A PDF of `pages` (A6, 14 pt) where the page numbers (1-based) in `scanned` are images.

    The other pages keep their text layer, as a document that was part typed, part scanned.
    """
    pictures = render_pdf_pages(make_text_pdf_pages(pages), SCAN_DPI)
    pdf = FPDF(format=_A6_MM)
    pdf.set_creation_date(datetime(2024, 1, 1, tzinfo=UTC))
    pdf.set_font("Helvetica", size=14)
    for number, text in enumerate(pages, 1):
        pdf.add_page()
        if number in scanned:
            png = io.BytesIO()
            pictures[number - 1].save(png, format="PNG")
            pdf.image(png, x=0, y=0, w=pdf.w, h=pdf.h)
        else:
            pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_png_header(width: int, height: int) -> bytes:
    """A PNG that says it is `width` x `height` (a decompression bomb) but holds one row."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row))
        + _png_chunk(b"IEND", b"")
    )
