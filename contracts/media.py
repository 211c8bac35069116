"""The content types Sluice ingests, decided from a file's bytes, never its name."""

from __future__ import annotations

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

SUPPORTED: frozenset[str] = frozenset({PDF, DOCX, HTML, MARKDOWN, TEXT})

# How error messages name formats to a person.
NAMES: dict[str, str] = {
    PDF: "PDF",
    DOCX: "Word document",
    HTML: "HTML page",
    MARKDOWN: "Markdown file",
    TEXT: "text file",
}
SUPPORTED_NAMES = "PDF, Word (.docx), HTML, Markdown or plain text"
