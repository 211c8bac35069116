"""Log set-up shared by every Sluice process: JSON lines for machines, one readable line for
people, and per-message context (job, document, stage, trace) on every record.

Context lives in a `ContextVar`, so each asyncio task (each message in hand) sees only its own:
a task copies the context it was created in, and what it binds later stays with it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from opentelemetry import trace

# The fields the runtime binds for each message, in the order they are shown.
CONTEXT_FIELDS = ("job_id", "document_id", "stage", "trace_id")
# Loggers that must end in our handler even when a library set them up on its own.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# The text format shows these first, with short labels and ids cut to 8 characters (enough to
# tell jobs apart on a screen; the JSON lines keep them whole).
_TEXT_LABELS = {"job_id": ("job", 8), "trace_id": ("trace", 8), "document_id": ("doc", 8)}
# Attributes every LogRecord has; context fields never overwrite them.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "sluice_context",
}

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("sluice_log_context", default=_EMPTY)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every log record of the current task until the block ends.

    Nested blocks add to (and may override) the outer ones; fields given as None are left out.
    """
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add `fields` to the current context (until the enclosing `log_context` ends)."""
    _context.set(_merged(fields))


def current_context() -> dict[str, Any]:
    """The fields records of the current task carry now."""
    return dict(_context.get())


def _merged(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    clash = _RECORD_ATTRIBUTES.intersection(fields)
    if clash:
        raise ValueError(
            f"log context fields may not be named {sorted(clash)}: LogRecord uses them"
        )
    merged = {**_context.get(), **fields}
    return MappingProxyType({k: v for k, v in merged.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the task's log context (and the current trace id) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the context as `record.sluice_context` and as attributes; never drops a record."""
        fields = dict(_context.get())
        # Fields given with `extra=` on the call itself win over the task's context.
        fields.update({k: v for k, v in vars(record).items() if k in CONTEXT_FIELDS})
        if "trace_id" not in fields and (trace_id := _current_trace_id()):
            fields["trace_id"] = trace_id
        for key, value in fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        record.sluice_context = fields
        return True


def _current_trace_id() -> str | None:
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Context fields of a record, known ones first."""
    context: dict[str, Any] = getattr(record, "sluice_context", {})
    known = {k: context[k] for k in CONTEXT_FIELDS if k in context}
    return known | {k: v for k, v in context.items() if k not in known}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, service, logger, message,
    the context fields, and the formatted exception if there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`2026-11-22 06:10:01 INFO  sluice-embed  job=3f2c1a9e… trace=9a1b0c2d… message`,
    with a traceback on the lines below when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one readable line (plus traceback lines)."""
        parts = [self.formatTime(record, self.datefmt), f"{record.levelname:<5}", self.service]
        fields = _fields(record)
        if f"sluice-{fields.get('stage')}" == self.service:
            del fields["stage"]  # The service name says it already.
        ordered = {k: fields.pop(k) for k in _TEXT_LABELS if k in fields} | fields
        context = " ".join(_label(k, v) for k, v in ordered.items())
        line = " ".join(parts) + "  " + (f"{context} " if context else "") + record.getMessage()
        if record.levelno >= logging.WARNING and not record.name.startswith("uvicorn"):
            # Where a problem was reported matters to whoever reads the warning.
            line += f"  [{record.name}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _label(key: str, value: Any) -> str:
    label, width = _TEXT_LABELS.get(key, (key, 0))
    text = str(value)
    if width and len(text) > width + 1:
        text = text[:width] + "…"
    return f"{label}={text}"


class _SluiceHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (and replaces when called again)."""


def configure_logging(
    service: str,
    log_format: str = "auto",
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every record (uvicorn's too) to stderr as JSON lines, or as text on a terminal.

    `log_format` is `json`, `text`, or `auto` (text when the stream is a terminal). Calling it
    again replaces the handler it installed before. Returns the handler.
    """
    out = stream if stream is not None else sys.stderr
    if log_format not in ("auto", "json", "text"):
        raise ValueError(f"log_format must be auto, json or text, not {log_format!r}")
    if log_format == "auto":
        log_format = "text" if _is_terminal(out) else "json"
    handler = _SluiceHandler(out)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter(service))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _SluiceHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own config gives these loggers handlers, levels and stops propagation; undo
    # that so its startup and access lines come out in the same format with the same context.
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    # Per-delivery chatter from the AMQP client drowns the pipeline's own story.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    return handler


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # A closed stream.
        return False
