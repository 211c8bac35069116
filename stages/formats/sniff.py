"""Deciding a file's content type from its bytes: magic numbers, zip contents, then text shape."""

from __future__ import annotations

import pathlib
import re
import zipfile

from contracts import media
from contracts.errors import Permanent
from stages.formats.encoding import decode_text

HEAD_BYTES = 64 * 1024
_HTML_WINDOW_CHARS = 4 * 1024
_DOCX_MAIN_PART = "word/document.xml"

# Only used to tell a person what they uploaded instead; never to accept a file.
_KNOWN_BINARIES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"RIFF", "a RIFF media file (WebP, WAV or AVI)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "a Linux executable"),
    (b"MZ", "a Windows executable"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Office file (.doc/.xls/.ppt)"),
    (b"{\\rtf", "an RTF document"),
)
_HTML_START = re.compile(r"\A\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]", re.I | re.S)
_HTML_TAG = re.compile(r"<(?:html|head|body)[\s>]", re.I)
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.M)
_FENCE = re.compile(r"^ {0,3}(?:```|~~~)", re.M)
_LINK = re.compile(r"!?\[[^\]\n]+\]\([^)\s]+(?:\s+\"[^\"\n]*\")?\)")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,3}[.)])[ \t]+\S", re.M)
_INLINE_MARKUP = re.compile(r"(\*\*|__)\S[^\n]*?\1|`[^`\n]+`")
_MIN_LIST_ITEMS = 3


_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", media.PNG),
    (b"\xff\xd8\xff", media.JPEG),
    (b"II*\x00", media.TIFF),
    (b"MM\x00*", media.TIFF),
)


def sniff(path: pathlib.Path, *, images: bool = True) -> str:
    """The content type of the file at `path`, from its bytes; `Permanent` if unsupported.

    `images`: whether PNG, JPEG and TIFF are taken (they are read with OCR, so only while
    it is on); otherwise they are refused with a sentence that says so.
    """
    with path.open("rb") as file:
        head = file.read(HEAD_BYTES)
        complete = not file.read(1)
    if not head:
        raise Permanent(
            "The uploaded file is empty (0 bytes); upload the document again.", code="empty_file"
        )
    if head.lstrip(b"\x00\t\n\r\f ").startswith(b"%PDF-"):
        return media.PDF
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path)
    for magic, image_type in _IMAGES:
        if head.startswith(magic):
            if images:
                return image_type
            raise Permanent(
                f"The uploaded file is a {media.NAMES[image_type]}, which Sluice reads only with "
                "OCR, and OCR is off here (SLUICE_OCR=false); upload "
                f"{media.SUPPORTED_NAMES_WITHOUT_OCR}, or ask the operator to turn OCR on.",
                code="unsupported_media_type",
            )
    text = decode_text(head, final=complete)
    if text is None:
        raise _unsupported(_describe_binary(head))
    if _looks_like_html(text):
        return media.HTML
    if _looks_like_markdown(text):
        return media.MARKDOWN
    return media.TEXT


def _sniff_zip(path: pathlib.Path) -> str:
    # ZipFile reads only the central directory at the end, not the (maybe huge) members.
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, ValueError) as exc:
        raise _unsupported("a damaged or truncated zip archive") from exc
    if _DOCX_MAIN_PART in names:
        return media.DOCX
    raise _unsupported(_describe_zip(names))


def _describe_zip(names: set[str]) -> str:
    if "xl/workbook.xml" in names:
        return "an Excel workbook (.xlsx)"
    if "ppt/presentation.xml" in names:
        return "a PowerPoint presentation (.pptx)"
    if "content.xml" in names and "mimetype" in names:
        return "an OpenDocument file (.odt/.ods/.odp; save it as .docx or PDF)"
    if "META-INF/MANIFEST.MF" in names:
        return "a Java archive (.jar)"
    return "a zip archive without a Word document in it (upload its files one by one)"


def _describe_binary(head: bytes) -> str:
    for magic, name in _KNOWN_BINARIES:
        if head.startswith(magic):
            return name
    return "binary data of an unknown type"


def _looks_like_html(text: str) -> bool:
    start = text.lstrip("\ufeff")
    if _HTML_START.match(start):
        return True
    return _HTML_TAG.search(start[:_HTML_WINDOW_CHARS]) is not None


def _looks_like_markdown(text: str) -> bool:
    # A heading, a code fence or a link is decisive; dashed lists alone are common in plain
    # notes, so they count only with inline markup (bold, `code`) beside them.
    if _ATX_HEADING.search(text) or _LINK.search(text):
        return True
    if len(_FENCE.findall(text)) >= 2:
        return True
    lists = len(_LIST_ITEM.findall(text)) >= _MIN_LIST_ITEMS
    return lists and _INLINE_MARKUP.search(text) is not None


def _unsupported(detected: str) -> Permanent:
    return Permanent(
        f"The uploaded file is {detected}, which Sluice cannot ingest; "
        f"upload {media.SUPPORTED_NAMES}.",
        code="unsupported_media_type",
    )
