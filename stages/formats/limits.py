"""How much of a document the parsers accept, and the error a person reads when it is too much."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.errors import Permanent
from contracts.settings import Settings


def _default(field: str) -> int:
    # One source for the numbers: the settings' own defaults.
    value = Settings.model_fields[field].default
    assert isinstance(value, int)
    return value


@dataclass(frozen=True)
class Limits:
    """The size limits the format layer enforces, cheaply and before the expensive work."""

    max_pdf_pages: int = _default("max_pdf_pages")
    max_docx_uncompressed_bytes: int = _default("max_docx_uncompressed_bytes")
    max_html_bytes: int = _default("max_html_bytes")
    max_text_chars: int = _default("max_text_chars")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits configured by `SLUICE_MAX_*` settings."""
        return cls(
            max_pdf_pages=settings.max_pdf_pages,
            max_docx_uncompressed_bytes=settings.max_docx_uncompressed_bytes,
            max_html_bytes=settings.max_html_bytes,
            max_text_chars=settings.max_text_chars,
        )


DEFAULT_LIMITS = Limits()


class TextBudget:
    """Counts extracted characters so a parser can stop as soon as a document is too long."""

    def __init__(self, limits: Limits, what: str) -> None:
        self.limit = limits.max_text_chars
        self.what = what
        self.used = 0

    def spend(self, text: str, where: str = "") -> None:
        """Count `text`; `Permanent` `text_too_long` once the total passes the limit."""
        self.used += len(text)
        if self.used > self.limit:
            raise text_too_long(self.what, self.used, self.limit, where)


def text_too_long(what: str, chars: int, limit: int, where: str = "") -> Permanent:
    """The error for a document whose text passes `max_text_chars`."""
    at = f" {where}" if where else ""
    return Permanent(
        f"The {what} has more than {limit:,} characters of text (at least {chars:,}{at}); "
        f"the limit is {limit:,} (SLUICE_MAX_TEXT_CHARS). Split it and upload the parts.",
        code="text_too_long",
    )
