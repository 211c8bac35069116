"""OCR of real rendered pages (scanned PDFs, PNG, TIFF) with each engine, and its failures."""

from __future__ import annotations

import io
import pathlib
import re
from collections.abc import Callable

import pytest
from documents import (
    OCR_SENTENCES,
    make_mixed_pdf,
    make_png_header,
    make_png_of_page,
    make_scanned_pdf,
    make_text_pdf_pages,
    make_tiff_of_pages,
    render_pdf_pages,
)
from fpdf import FPDF
from PIL import Image

from contracts import media
from contracts.errors import Permanent
from stages.formats import ocr
from stages.formats.ocr import (
    MAX_OCR_PIXELS,
    OCR_DPI,
    OCR_ENGINES,
    engine_available,
    image_page_count,
    ocr_page,
    render_pdf_page,
)
from stages.formats.pdf import parse_pdf
from stages.kit.sandbox import Sandbox

PNG, JPEG, TIFF = "image/png", "image/jpeg", "image/tiff"
SENTENCES = list(OCR_SENTENCES[:3])


def words(text: str) -> list[str]:
    """Lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def assert_reads(text: str, sentence: str) -> None:
    """Most of `sentence`'s words are in `text` (OCR may slip on one), its noun without fail."""
    found = set(words(text))
    wanted = words(sentence)
    recall = sum(word in found for word in wanted) / len(wanted)
    noun = wanted[2]  # walrus, kettle, heron, lanterns: the word only that page has
    assert recall >= 0.8 and noun in found, f"{sentence!r} not read in {text!r}"


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    """`data` in a file of `tmp_path`."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(params=OCR_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each engine; both are installed for the tests (scripts/install.sh picks a Python that
    RapidOCR's wheel supports, scripts/test.sh the libraries OpenCV needs)."""
    name: str = request.param
    missing = engine_available(name)
    assert missing is None, missing
    return name


@pytest.fixture(scope="module")
def text_pdf() -> bytes:
    """Three small pages, one sentence each, with a text layer."""
    return make_text_pdf_pages(SENTENCES)


def test_reads_every_page_of_a_scanned_pdf(
    tmp_path: pathlib.Path, text_pdf: bytes, engine: str
) -> None:
    path = write(tmp_path, "scan.pdf", make_scanned_pdf(text_pdf))
    with pytest.raises(Permanent) as caught:
        parse_pdf(path)  # no text layer: only OCR can read it
    assert caught.value.code == "no_text"
    for page, sentence in enumerate(SENTENCES, 1):
        text = ocr_page(path, media.PDF, page, engine)
        assert_reads(text, sentence)
        for other in set(SENTENCES) - {sentence}:
            assert words(other)[2] not in words(text)


def test_reads_a_png(tmp_path: pathlib.Path, text_pdf: bytes, engine: str) -> None:
    path = write(tmp_path, "page.png", make_png_of_page(text_pdf, 2))
    assert image_page_count(path, PNG) == 1
    assert_reads(ocr_page(path, PNG, 1, engine), SENTENCES[1])


@pytest.mark.parametrize("bilevel", [False, True], ids=["grey", "g4-fax"])
def test_reads_each_frame_of_a_tiff(
    tmp_path: pathlib.Path, text_pdf: bytes, engine: str, bilevel: bool
) -> None:
    path = write(tmp_path, "pages.tiff", make_tiff_of_pages(text_pdf, bilevel=bilevel))
    assert image_page_count(path, TIFF) == len(SENTENCES)
    for page, sentence in enumerate(SENTENCES, 1):
        assert_reads(ocr_page(path, TIFF, page, engine), sentence)


def test_mixed_pdf_scanned_pages_need_ocr(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "mixed.pdf", make_mixed_pdf(list(OCR_SENTENCES), scanned={2, 4}))
    pages, sections = parse_pdf(path)
    assert pages == 4
    assert [s.page for s in sections] == [1, 3]
    assert_reads(ocr_page(path, media.PDF, 2, "tesseract"), OCR_SENTENCES[1])
    assert_reads(ocr_page(path, media.PDF, 4, "tesseract"), OCR_SENTENCES[3])
    # A page with a text layer renders and reads like any other.
    assert_reads(ocr_page(path, media.PDF, 3, "tesseract"), OCR_SENTENCES[2])


def test_transparent_png_is_read_on_white(tmp_path: pathlib.Path, text_pdf: bytes) -> None:
    grey = render_pdf_pages(text_pdf, 150)[0]
    # Black ink on nothing: transparent pixels are (0, 0, 0, 0), black if alpha is dropped.
    ink = Image.new("RGBA", grey.size, (0, 0, 0, 0))
    ink.putalpha(grey.point(lambda v: 255 - v))
    buffer = io.BytesIO()
    ink.save(buffer, format="PNG")
    path = write(tmp_path, "ink.png", buffer.getvalue())
    assert_reads(ocr_page(path, PNG, 1, "tesseract"), SENTENCES[0])


def test_jpeg_is_turned_upright_by_its_exif_orientation(
    tmp_path: pathlib.Path, text_pdf: bytes
) -> None:
    page = render_pdf_pages(text_pdf, 150)[2]
    # Stored as a phone stores a sideways shot: pixels rotated, EXIF orientation 6.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    page.rotate(90, expand=True).save(buffer, format="JPEG", quality=90, exif=exif)
    path = write(tmp_path, "photo.jpg", buffer.getvalue())
    assert image_page_count(path, JPEG) == 1
    assert_reads(ocr_page(path, JPEG, 1, "tesseract"), SENTENCES[2])


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n" + b"not really a png at all" * 10, b"\x00" * 64],
    ids=["bad-chunks", "zeros"],
)
def test_unreadable_image_is_permanent(tmp_path: pathlib.Path, data: bytes) -> None:
    path = write(tmp_path, "broken.png", data)
    calls: list[Callable[[], object]] = [
        lambda: image_page_count(path, PNG),
        lambda: ocr_page(path, PNG, 1),
    ]
    for call in calls:
        with pytest.raises(Permanent) as caught:
            call()
        assert caught.value.code == "unreadable_image"
        assert "upload it again" in caught.value.message


def test_truncated_image_is_permanent(tmp_path: pathlib.Path, text_pdf: bytes) -> None:
    data = make_png_of_page(text_pdf, 1)
    path = write(tmp_path, "cut.png", data[: len(data) // 2])
    with pytest.raises(Permanent) as caught:
        ocr_page(path, PNG, 1)
    assert caught.value.code == "unreadable_image"


@pytest.mark.parametrize(
    "size",
    [(8_000, 6_000), (20_000, 20_000)],
    ids=["over-our-limit", "over-pillows-limit"],
)
def test_decompression_bomb_is_refused_unread(
    tmp_path: pathlib.Path, size: tuple[int, int]
) -> None:
    path = write(tmp_path, "bomb.png", make_png_header(*size))
    assert path.stat().st_size < 10_000
    calls: list[Callable[[], object]] = [
        lambda: image_page_count(path, PNG),
        lambda: ocr_page(path, PNG, 1),
    ]
    for call in calls:
        with pytest.raises(Permanent) as caught:
            call()
        assert caught.value.code == "image_too_large"
        assert "lower resolution" in caught.value.message


def test_huge_pdf_page_is_rendered_smaller_not_refused(tmp_path: pathlib.Path) -> None:
    pdf = FPDF(format=(4000, 4000))  # 4 m a side: 32,000 px a side at 200 DPI
    pdf.add_page()
    path = write(tmp_path, "poster.pdf", bytes(pdf.output()))
    image = render_pdf_page(path, 1, OCR_DPI)
    assert 0.9 * MAX_OCR_PIXELS < image.width * image.height <= MAX_OCR_PIXELS
    assert image.mode == "L"


def test_page_outside_the_document_is_a_caller_error(
    tmp_path: pathlib.Path, text_pdf: bytes
) -> None:
    pdf = write(tmp_path, "text.pdf", text_pdf)
    png = write(tmp_path, "page.png", make_png_of_page(text_pdf, 1))
    with pytest.raises(ValueError, match="outside"):
        ocr_page(pdf, media.PDF, 4)
    with pytest.raises(ValueError, match="outside"):
        ocr_page(png, PNG, 2)
    with pytest.raises(ValueError, match="reads PDFs"):
        ocr_page(pdf, media.DOCX, 1)


def test_unknown_engine_names_the_known_ones(tmp_path: pathlib.Path, text_pdf: bytes) -> None:
    path = write(tmp_path, "text.pdf", text_pdf)
    calls: list[Callable[[], object]] = [
        lambda: ocr_page(path, media.PDF, 1, "easyocr"),
        lambda: engine_available(""),
    ]
    for call in calls:
        with pytest.raises(ValueError) as caught:
            call()
        assert all(name in str(caught.value) for name in OCR_ENGINES)


def test_engine_available_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_available("tesseract") is None
    monkeypatch.setenv("TESSDATA_PREFIX", "/nonexistent")
    monkeypatch.setattr(ocr, "_TESSDATA_DIRS", ())
    missing = engine_available("tesseract")
    assert missing is not None and "tesseract-ocr-eng" in missing and "/nonexistent" in missing


def test_rapidocr_boxes_become_lines_in_reading_order() -> None:
    box = ocr._Box
    found = [
        box(top=61, bottom=81, left=300, text="right half"),
        box(top=12, bottom=30, left=10, text="Title"),
        box(top=58, bottom=78, left=10, text="left half,"),  # a little skewed: same line
        box(top=84, bottom=104, left=10, text="next line"),
        box(top=150, bottom=170, left=10, text="new paragraph"),
    ]
    assert ocr._lines(found) == [
        "Title",
        "",
        "left half, right half",
        "next line",
        "",
        "new paragraph",
    ]


async def test_pages_are_read_in_the_sandbox_within_its_memory_limit(
    tmp_path: pathlib.Path, text_pdf: bytes
) -> None:
    path = write(tmp_path, "scan.pdf", make_scanned_pdf(text_pdf))
    # SLUICE_OCR_PAGE_MEMORY_MB's default: the default engine fits in it with room to spare.
    pool = Sandbox(1, timeout_s=60, memory_mb=1024, preload=["stages.formats.ocr"])
    await pool.start()
    try:
        for page, sentence in enumerate(SENTENCES, 1):
            assert_reads(await pool.run(ocr_page, path, media.PDF, page, "tesseract"), sentence)
    finally:
        await pool.close()
