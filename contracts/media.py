"""The content types Sluice ingests, decided from a file's bytes, never its name."""

from __future__ import annotations

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
# Images are read with OCR, so they are taken only while OCR is on (`SLUICE_OCR`).
PNG = "image/png"
JPEG = "image/jpeg"
TIFF = "image/tiff"

IMAGES: frozenset[str] = frozenset({PNG, JPEG, TIFF})
SUPPORTED: frozenset[str] = frozenset({PDF, DOCX, HTML, MARKDOWN, TEXT, *IMAGES})

# How error messages name formats to a person.
NAMES: dict[str, str] = {
    PDF: "PDF",
    DOCX: "Word document",
    HTML: "HTML page",
    MARKDOWN: "Markdown file",
    TEXT: "text file",
    PNG: "PNG image",
    JPEG: "JPEG image",
    TIFF: "TIFF image",
}
SUPPORTED_NAMES = "PDF, Word (.docx), HTML, Markdown, plain text or a PNG, JPEG or TIFF image"
# What can be ingested while OCR is off.
SUPPORTED_NAMES_WITHOUT_OCR = "PDF, Word (.docx), HTML, Markdown or plain text"
