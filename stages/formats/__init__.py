"""The file-format layer: sniff a content type from bytes, and parse a file into text sections."""

from stages.formats.dispatch import FirstRead, first_read, parse_document, whole_document
from stages.formats.limits import Limits
from stages.formats.sniff import sniff

__all__ = ["FirstRead", "Limits", "first_read", "parse_document", "sniff", "whole_document"]
