"""The file-format layer: sniff a content type from bytes, and parse a file into text sections."""

from stages.formats.dispatch import parse_document
from stages.formats.limits import Limits
from stages.formats.sniff import sniff

__all__ = ["Limits", "parse_document", "sniff"]
