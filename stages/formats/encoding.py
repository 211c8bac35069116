"""Turning bytes of unknown encoding into text, or deciding they are not text at all."""

from __future__ import annotations

import codecs
import re

from charset_normalizer import from_bytes

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters real text does not contain (tab, newlines and form feed are fine).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_MAX_CONTROL_SHARE = 0.10
_SAMPLE_CHARS = 64 * 1024
# WHATWG's default for legacy text: short Western texts are ambiguous between code pages,
# and a Latin-1/cp1252 reading is by far the likeliest one.
_WESTERN = "cp1252"


def bom_encoding(data: bytes) -> str | None:
    """The codec named by `data`'s byte-order mark, if it has one."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    return None


def decode_text(data: bytes, *, final: bool = True, declared: str | None = None) -> str | None:
    """`data` as text (BOM, declared charset, UTF-8, else best guess), or None if it is binary.

    `final=False` means `data` is only the head of a file, so a character cut at the end is fine.
    """
    text = _decode(data, final=final, declared=declared)
    if text is None:
        return None
    sample = text[:_SAMPLE_CHARS]
    if sample and len(_CONTROL.findall(sample)) > _MAX_CONTROL_SHARE * len(sample):
        return None
    return text


def normalise_newlines(text: str) -> str:
    """Text with `\\r\\n` and `\\r` line ends turned into `\\n` and NULs dropped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _decode(data: bytes, *, final: bool, declared: str | None) -> str | None:
    encoding = bom_encoding(data)
    if encoding is not None:
        return _incremental(data, encoding, final=final, errors="replace")
    if b"\x00" in data:
        # Without a BOM, NULs mean binary (UTF-16 without a BOM is not worth guessing at).
        return None
    if declared is not None:
        return _incremental(data, declared, final=final, errors="replace")
    try:
        return _incremental(data, "utf-8", final=final, errors="strict")
    except UnicodeDecodeError:
        pass
    return _guess(data)


def _incremental(data: bytes, encoding: str, *, final: bool, errors: str) -> str:
    decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    return decoder.decode(data, final=final)


def _guess(data: bytes) -> str | None:
    matches = from_bytes(data)
    best = matches.best()
    if best is None:
        return None
    # Prefer cp1252 when charset-normalizer rates it as good as its pick (it often is not
    # its pick: "crème" scores the same as cp1250's "crčme" on a short text).
    tied = [m for m in matches if m.chaos == best.chaos and m.coherence == best.coherence]
    candidates = {name for m in tied for name in (m.encoding, *m.could_be_from_charset)}
    if _WESTERN in candidates:
        try:
            return data.decode(_WESTERN)
        except UnicodeDecodeError:
            pass
    return str(best)
