"""Structured logs: JSON lines with per-task context, a readable text line, exceptions kept."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from stages.infra.logs import bind, configure_logging, current_context, log_context

JOB = "3f2c1a9e5b7d4c2a8e6f0b1d3c5a7e9f"
TRACE = "9a1b0c2d3e4f5a6b7c8d9e0f1a2b3c4d"

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put the root logger (and uvicorn's) back as they were after each test."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    uvicorn = {n: logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    saved_uvicorn = {n: (list(lg.handlers), lg.propagate) for n, lg in uvicorn.items()}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, propagate) in saved_uvicorn.items():
        uvicorn[name].handlers[:] = handlers
        uvicorn[name].propagate = propagate


@pytest.fixture
def stream() -> io.StringIO:
    """Where the configured handler writes."""
    return io.StringIO()


@pytest.fixture
def json_lines(stream: io.StringIO) -> Lines:
    """Configure JSON logs into `stream`; returns a reader of the parsed lines so far."""
    configure_logging("sluice-test", "json", "DEBUG", stream=stream)
    return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_the_documented_fields(json_lines: Lines) -> None:
    logging.getLogger("sluice.test").info("embedded %d chunks", 64)
    [line] = json_lines()
    assert set(line) == {"time", "level", "service", "logger", "message"}
    assert line["level"] == "INFO"
    assert line["service"] == "sluice-test"
    assert line["logger"] == "sluice.test"
    assert line["message"] == "embedded 64 chunks"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]


def test_context_fields_ride_on_every_record_from_any_logger(json_lines: Lines) -> None:
    with log_context(job_id=JOB, document_id="doc-1", stage="embed", trace_id=TRACE):
        logging.getLogger("stages.runtime.runner").info("one")
        logging.getLogger("some.library").warning("two")
    logging.getLogger("stages.runtime.runner").info("after")
    first, second, after = json_lines()
    for line in (first, second):
        assert (line["job_id"], line["document_id"], line["stage"], line["trace_id"]) == (
            JOB,
            "doc-1",
            "embed",
            TRACE,
        )
    assert "job_id" not in after and "stage" not in after


def test_nested_contexts_add_and_override_then_restore(json_lines: Lines) -> None:
    log = logging.getLogger("sluice.test")
    with log_context(job_id=JOB, stage="parse"):
        with log_context(stage="chunk", document_id="doc-2", attempt=2):
            log.info("inner")
            bind(batch=3)
            log.info("bound")
        log.info("outer")
    inner, bound, outer = json_lines()
    assert (inner["job_id"], inner["stage"], inner["document_id"], inner["attempt"]) == (
        JOB,
        "chunk",
        "doc-2",
        2,
    )
    assert bound["batch"] == 3
    assert outer["stage"] == "parse" and outer["job_id"] == JOB
    assert "document_id" not in outer and "batch" not in outer
    assert current_context() == {}


def test_none_fields_are_left_out_and_record_attributes_refused(json_lines: Lines) -> None:
    with log_context(job_id=JOB, trace_id=None):
        logging.getLogger("x").info("no trace yet")
    assert "trace_id" not in json_lines()[0]
    with pytest.raises(ValueError, match="msg"), log_context(msg="clash"):
        pass


def test_extra_on_the_call_wins_over_the_context(json_lines: Lines) -> None:
    with log_context(job_id=JOB):
        logging.getLogger("x").info("other job", extra={"job_id": "job-2"})
    assert json_lines()[0]["job_id"] == "job-2"


async def test_context_does_not_leak_across_tasks(json_lines: Lines) -> None:
    log = logging.getLogger("sluice.test")
    # Every task logs only while the two workers are both inside their blocks.
    inside = asyncio.Barrier(3)

    async def work(job_id: str) -> None:
        with log_context(job_id=job_id):
            await inside.wait()
            log.info("working on %s", job_id)
            bind(stage=f"stage-{job_id}")
            await inside.wait()
            log.info("done with %s", job_id)
            await inside.wait()

    async def bystander() -> None:
        await inside.wait()
        log.info("not in any job")
        await inside.wait()
        await inside.wait()

    await asyncio.gather(work("a"), work("b"), bystander())
    log.info("back in the test")
    lines = {line["message"]: line for line in json_lines() if line["logger"] == "sluice.test"}
    assert len(lines) == 6
    for job in ("a", "b"):
        assert lines[f"working on {job}"]["job_id"] == job
        assert "stage" not in lines[f"working on {job}"]
        assert (lines[f"done with {job}"]["job_id"], lines[f"done with {job}"]["stage"]) == (
            job,
            f"stage-{job}",
        )
    for message in ("not in any job", "back in the test"):
        assert "job_id" not in lines[message] and "stage" not in lines[message]


async def test_a_task_started_inside_a_context_inherits_it(json_lines: Lines) -> None:
    async def child() -> None:
        logging.getLogger("x").info("child")

    with log_context(job_id=JOB):
        await asyncio.create_task(child())
    assert json_lines()[0]["job_id"] == JOB


def test_the_current_span_supplies_a_trace_id(json_lines: Lines) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("x").info("traced")
        expected = format(span.get_span_context().trace_id, "032x")
    with log_context(trace_id=TRACE), tracer.start_as_current_span("other"):
        logging.getLogger("x").info("explicit")
    traced, explicit = json_lines()
    assert traced["trace_id"] == expected
    assert explicit["trace_id"] == TRACE


def test_an_exception_is_included(json_lines: Lines) -> None:
    try:
        raise RuntimeError("the index is locked")
    except RuntimeError:
        logging.getLogger("x").exception("could not index")
    [line] = json_lines()
    assert line["level"] == "ERROR"
    assert line["message"] == "could not index"
    assert line["exc_info"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: the index is locked" in line["exc_info"]


def test_text_is_one_readable_line(stream: io.StringIO) -> None:
    configure_logging("sluice-embed", "text", stream=stream)
    with log_context(job_id=JOB, trace_id=TRACE, stage="embed"):
        logging.getLogger("stages.builtin.embed").info("embedded %d chunks", 64)
    line = stream.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO  sluice-embed  "
        r"job=3f2c1a9e… trace=9a1b0c2d… embedded 64 chunks\n",
        line,
    ), line


def test_text_keeps_the_traceback_below_the_line(stream: io.StringIO) -> None:
    configure_logging("sluice-parse", "text", stream=stream)
    try:
        raise ValueError("bad page")
    except ValueError:
        logging.getLogger("stages.builtin.parse").exception("parse failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR sluice-parse  parse failed  [stages.builtin.parse]"), first
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad page"


def test_auto_is_json_off_a_terminal_and_text_on_one(stream: io.StringIO) -> None:
    configure_logging("sluice-test", "auto", stream=stream)
    logging.getLogger("x").info("piped")
    assert json.loads(stream.getvalue())["message"] == "piped"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    configure_logging("sluice-test", "auto", stream=terminal)
    logging.getLogger("x").info("typed")
    assert terminal.getvalue().rstrip().endswith("sluice-test  typed")
    # Configuring again replaced the first handler instead of adding a second.
    assert stream.getvalue().count("\n") == 1


def test_uvicorn_loggers_use_the_same_handler(stream: io.StringIO) -> None:
    # What uvicorn's default config would do: own handlers, no propagation.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.StreamHandler(io.StringIO()))
        logger.propagate = False
    configure_logging("sluice-gateway", "json", stream=stream)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", "/v1/documents", "1.1", 202
    )
    started, access = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (started["logger"], started["message"]) == (
        "uvicorn.error",
        "Started server process [42]",
    )
    assert access["message"] == '127.0.0.1:5000 - "POST /v1/documents HTTP/1.1" 202'
    assert access["service"] == "sluice-gateway"


def test_amqp_client_chatter_is_quiet(json_lines: Lines) -> None:
    logging.getLogger("aiormq.connection").info("frame received")
    logging.getLogger("aio_pika.queue").debug("message delivered")
    logging.getLogger("aio_pika.robust_connection").warning("connection lost")
    assert [line["message"] for line in json_lines()] == ["connection lost"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("sluice-test", "yaml")
