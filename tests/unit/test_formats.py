"""Sniffing and parsing real documents built by `tests/documents.py`, no broker needed."""

from __future__ import annotations

import io
import pathlib
import zipfile

import docx
import pytest
from documents import (
    make_corrupt_pdf,
    make_docx,
    make_docx_bomb,
    make_encrypted_pdf,
    make_html,
    make_image_only_pdf,
    make_latin1_text,
    make_many_page_pdf,
    make_markdown,
    make_pdf,
    make_png,
)

from contracts import media
from contracts.errors import Permanent
from contracts.settings import Settings
from stages.formats import Limits, parse_document, sniff

ARTICLE = [
    "Rivers carry sediment from the mountains to the sea, shaping valleys over millennia.",
    "Where a river slows near the coast it drops its load and builds a fertile delta plain.",
    "Engineers build levees to control floods, but levees can starve wetlands of silt.",
    "Restoring natural floodplains is now seen as a cheaper way to reduce flood risk.",
    "Several cities have removed concrete channels and let their rivers meander again.",
]
LATIN1 = "Le garçon a mangé une crème brûlée à Zürich; über schön, naïve façade."


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def other_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.bin", make_pdf(["Hello PDF."]), media.PDF),
        ("a.bin", make_docx(["Hello Word."], [["a", "b"]]), media.DOCX),
        ("a.txt", make_html("A page", ARTICLE), media.HTML),
        ("a.txt", make_markdown("Guide", {"Install": "Run the installer."}), media.MARKDOWN),
        ("a.md", b"Just a note.\nNothing special here.\n", media.TEXT),
        ("a.html", make_latin1_text(LATIN1), media.TEXT),
        ("a.txt", "\ufeffUTF-16 text with ü.".encode("utf-16"), media.TEXT),
    ],
    ids=["pdf", "docx", "html", "markdown", "text", "latin1", "utf16"],
)
def test_sniff_reads_the_bytes_not_the_name(
    tmp_path: pathlib.Path, name: str, data: bytes, expected: str
) -> None:
    assert sniff(write(tmp_path, name, data)) == expected


@pytest.mark.parametrize(
    ("name", "data", "detected"),
    [
        ("photo.pdf", make_png(), "PNG image"),
        ("sheet.docx", other_zip(), "Excel workbook"),
        ("a.txt", b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8, "Linux executable"),
        ("a.txt", bytes(range(256)) * 16, "unknown type"),
    ],
    ids=["png-named-pdf", "xlsx-zip", "elf", "random"],
)
def test_sniff_rejects_binary_with_an_actionable_message_when_ocr_is_off(
    tmp_path: pathlib.Path, name: str, data: bytes, detected: str
) -> None:
    with pytest.raises(Permanent) as caught:
        sniff(write(tmp_path, name, data), images=False)
    assert caught.value.code == "unsupported_media_type"
    assert detected in caught.value.message
    assert "PDF" in caught.value.message  # names what would have been accepted


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"II*\x00", "image/tiff"),
        (b"MM\x00*", "image/tiff"),
    ],
    ids=["png", "jpeg", "tiff-le", "tiff-be"],
)
def test_images_are_sniffed_from_their_bytes_while_ocr_is_on(
    tmp_path: pathlib.Path, head: bytes, expected: str
) -> None:
    path = write(tmp_path, "scan.pdf", head + bytes(range(256)) * 4)
    assert sniff(path) == expected
    with pytest.raises(Permanent) as caught:
        sniff(path, images=False)
    assert "SLUICE_OCR" in caught.value.message


def test_sniff_empty_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(Permanent) as caught:
        sniff(write(tmp_path, "empty.pdf", b""))
    assert caught.value.code == "empty_file"


def test_pdf_keeps_each_page_on_its_page_number(tmp_path: pathlib.Path) -> None:
    pages = ["Apples grow in the orchard.", "Bananas ripen in the sun.", "Cherries are red."]
    parsed = parse_document(write(tmp_path, "f.pdf", make_pdf(pages)), media.PDF)
    assert parsed.pages == 3
    assert [(s.page, s.text) for s in parsed.sections] == [
        (1, pages[0]),
        (2, pages[1]),
        (3, pages[2]),
    ]


def test_encrypted_pdf(tmp_path: pathlib.Path) -> None:
    with pytest.raises(Permanent) as caught:
        parse_document(write(tmp_path, "f.pdf", make_encrypted_pdf("Secret plans.")), media.PDF)
    assert caught.value.code == "encrypted_pdf"
    assert "password" in caught.value.message


def test_image_only_pdf_has_no_text(tmp_path: pathlib.Path) -> None:
    with pytest.raises(Permanent) as caught:
        parse_document(write(tmp_path, "scan.pdf", make_image_only_pdf()), media.PDF)
    assert caught.value.code == "no_text"
    assert "OCR" in caught.value.message


def test_truncated_pdf_is_unreadable(tmp_path: pathlib.Path) -> None:
    data = make_pdf(["Some text that will be cut off."] * 3)
    path = write(tmp_path, "cut.pdf", data[: len(data) // 4])
    assert sniff(path) == media.PDF  # still looks like a PDF, so it reaches the parser
    with pytest.raises(Permanent) as caught:
        parse_document(path, media.PDF)
    assert caught.value.code == "unreadable_pdf"


def test_docx_paragraphs_table_and_heading_in_order(tmp_path: pathlib.Path) -> None:
    data = make_docx(
        ["The inventory as of March.", "Counts are per crate."],
        [["Fruit", "Count"], ["Apple", "12"], ["Pear", "7"]],
        heading="Stock report",
    )
    parsed = parse_document(write(tmp_path, "f.docx", data), media.DOCX)
    assert parsed.pages is None
    text = "\n".join(s.text for s in parsed.sections)
    assert text.index("The inventory") < text.index("Counts are") < text.index("Apple | 12")
    assert "Fruit | Count" in text
    assert "Pear | 7" in text
    assert {s.heading for s in parsed.sections} == {"Stock report"}


def test_broken_docx_is_unreadable(tmp_path: pathlib.Path) -> None:
    data = make_docx(["Hello."], [])
    with pytest.raises(Permanent) as caught:
        parse_document(write(tmp_path, "f.docx", data[: len(data) // 2]), media.DOCX)
    assert caught.value.code == "unreadable_docx"


def test_html_keeps_the_article_and_drops_boilerplate(tmp_path: pathlib.Path) -> None:
    parsed = parse_document(write(tmp_path, "p.html", make_html("Rivers", ARTICLE)), media.HTML)
    text = "\n".join(s.text for s in parsed.sections)
    for paragraph in ARTICLE:
        assert paragraph in text
    for boilerplate in ("Contact sales", "All rights reserved", "analyticsQueue", "advertisement"):
        assert boilerplate not in text
    assert parsed.sections[0].heading == "Rivers"


def test_html_honours_meta_charset(tmp_path: pathlib.Path) -> None:
    page = f'<html><head><meta charset="windows-1252"></head><body><p>{LATIN1}</p></body></html>'
    parsed = parse_document(write(tmp_path, "p.html", page.encode("cp1252")), media.HTML)
    assert LATIN1 in parsed.sections[0].text


def test_markdown_headings_become_section_headings(tmp_path: pathlib.Path) -> None:
    data = make_markdown(
        "Guide",
        {"Install": "Run the installer.", "Usage": "```sh\n# not a heading\nsluice up\n```"},
    )
    parsed = parse_document(write(tmp_path, "g.md", data), media.MARKDOWN)
    assert [s.heading for s in parsed.sections] == ["Guide", "Install", "Usage"]
    assert "Run the installer." in parsed.sections[1].text
    assert "# not a heading" in parsed.sections[2].text


def test_latin1_text_decodes_accents(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", make_latin1_text(LATIN1 + "\r\nSecond line.\r\n"))
    parsed = parse_document(path, media.TEXT)
    assert parsed.sections[0].text == LATIN1 + "\nSecond line."


def test_whitespace_only_text_has_no_text(tmp_path: pathlib.Path) -> None:
    with pytest.raises(Permanent) as caught:
        parse_document(write(tmp_path, "blank.txt", b"  \n\n\t\n"), media.TEXT)
    assert caught.value.code == "no_text"


def test_unknown_content_type(tmp_path: pathlib.Path) -> None:
    with pytest.raises(Permanent) as caught:
        parse_document(write(tmp_path, "x.png", make_png()), "image/png")
    assert caught.value.code == "unsupported_media_type"


def test_corrupt_pdf_is_unreadable(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "corrupt.pdf", make_corrupt_pdf())
    assert sniff(path) == media.PDF
    with pytest.raises(Permanent) as caught:
        parse_document(path, media.PDF)
    assert caught.value.code == "unreadable_pdf"


# ---- Limits: each one breached fails with its own code and says which setting to change. ----


def limited(code: str, path: pathlib.Path, content_type: str, limits: Limits) -> Permanent:
    with pytest.raises(Permanent) as caught:
        parse_document(path, content_type, limits)
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_limits_come_from_settings() -> None:
    settings = Settings(
        max_pdf_pages=7,
        max_docx_uncompressed_bytes=1000,
        max_html_bytes=2000,
        max_text_chars=3000,
    )
    assert Limits.from_settings(settings) == Limits(7, 1000, 2000, 3000)
    assert Limits() == Limits.from_settings(Settings())


def test_pdf_over_the_page_limit(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "long.pdf", make_many_page_pdf(4))
    assert parse_document(path, media.PDF, Limits(max_pdf_pages=4)).pages == 4
    error = limited("too_many_pages", path, media.PDF, Limits(max_pdf_pages=3))
    assert error.message == (
        "The PDF has 4 pages; the limit is 3 (SLUICE_MAX_PDF_PAGES). Split it and upload the parts."
    )


def test_pdf_text_limit_stops_at_the_page_that_passes_it(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "wordy.pdf", make_pdf(["x" * 50] * 5))
    error = limited("text_too_long", path, media.PDF, Limits(max_text_chars=120))
    assert "by page 3 of 5" in error.message
    assert "SLUICE_MAX_TEXT_CHARS" in error.message


def test_docx_bomb_over_the_size_limit_is_refused_before_python_docx_opens_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_open(*args: object) -> None:
        raise AssertionError("python-docx opened a zip bomb")

    monkeypatch.setattr(docx, "Document", must_not_open)
    path = write(tmp_path, "bomb.docx", make_docx_bomb(8 << 20))
    assert sniff(path) == media.DOCX
    assert path.stat().st_size < 64 * 1024
    error = limited("docx_too_large", path, media.DOCX, Limits(max_docx_uncompressed_bytes=4 << 20))
    assert "SLUICE_MAX_DOCX_UNCOMPRESSED_BYTES" in error.message
    # Under the size limit, its compression ratio alone gives it away.
    error = limited("docx_too_large", path, media.DOCX, Limits())
    assert "zip bomb" in error.message


def test_docx_with_absurdly_many_parts(tmp_path: pathlib.Path) -> None:
    buffer = io.BytesIO(make_docx(["Hello."], []))
    with zipfile.ZipFile(buffer, "a") as archive:
        for number in range(10_001):
            archive.writestr(f"word/media/p{number}.xml", "")
    path = write(tmp_path, "parts.docx", buffer.getvalue())
    error = limited("docx_too_large", path, media.DOCX, Limits())
    assert "parts" in error.message


def test_docx_text_limit(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "f.docx", make_docx(["y" * 60, "z" * 60], [["a", "b"]]))
    assert parse_document(path, media.DOCX, Limits(max_text_chars=200)).sections
    limited("text_too_long", path, media.DOCX, Limits(max_text_chars=100))


def test_html_over_the_byte_limit(tmp_path: pathlib.Path) -> None:
    data = make_html("Rivers", ARTICLE)
    path = write(tmp_path, "p.html", data)
    assert parse_document(path, media.HTML, Limits(max_html_bytes=len(data))).sections
    error = limited("html_too_large", path, media.HTML, Limits(max_html_bytes=len(data) - 1))
    assert "SLUICE_MAX_HTML_BYTES" in error.message


def test_html_text_limit(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "p.html", make_html("Rivers", ARTICLE))
    limited("text_too_long", path, media.HTML, Limits(max_text_chars=100))


@pytest.mark.parametrize("content_type", [media.TEXT, media.MARKDOWN])
def test_text_limit(tmp_path: pathlib.Path, content_type: str) -> None:
    path = write(tmp_path, "t.txt", "é".encode() * 100)  # 200 bytes, 100 characters
    assert parse_document(path, content_type, Limits(max_text_chars=100)).sections
    error = limited("text_too_long", path, content_type, Limits(max_text_chars=99))
    assert "the limit is 99 (SLUICE_MAX_TEXT_CHARS)" in error.message
    # Far past the limit in bytes, it is refused without decoding.
    limited("text_too_long", path, content_type, Limits(max_text_chars=10))
