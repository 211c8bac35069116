"""The Celery baseline: Sluice's four stage handlers as Celery tasks, chained per document.

Workers: `celery -A bench.celery_app worker -Q bench.celery.<stage>` (bench/celery_run.py
starts one per stage); the broker URL comes from `SLUICE_BENCH_AMQP_URL`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

from celery import Celery  # type: ignore[import-untyped, import-not-found, unused-ignore]

from contracts.messages import StageName
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from contracts.settings import Settings
from stages.stage import load_stage


def queue_of(stage: StageName) -> str:
    """The Celery queue a stage's tasks go to (and its worker consumes)."""
    return f"bench.celery.{stage}"


app = Celery("sluice-bench", broker=os.environ.get("SLUICE_BENCH_AMQP_URL"), backend="rpc://")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_routes={f"bench.{s}": {"queue": queue_of(s)} for s in STAGES},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

T = TypeVar("T")
_contexts: dict[StageName, Any] = {}
_contexts_lock = threading.Lock()
_local = threading.local()


def _runner() -> asyncio.Runner:
    # One event loop per worker thread for the worker's life (asyncio.run, kept open): each
    # stage's context (parse's worker processes, the model, the index) is built once and reused.
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
    return runner


async def _awaited(work: Awaitable[T]) -> T:
    return await work


def run_stage(name: StageName, messages: list[str]) -> tuple[list[str], int]:
    """Call a stage's handler on each JSON message, in order: its outputs as JSON, and how many
    chunks the inputs held."""
    stage = load_stage(name, Settings())
    runner = _runner()
    with _contexts_lock:
        if name not in _contexts:
            _contexts[name] = runner.run(_awaited(stage.startup(Settings())))
    outputs: list[str] = []
    chunks = 0
    for body in messages:
        msg = stage.input.model_validate_json(body)
        chunks += msg.unit()[2]
        produced = runner.run(_awaited(stage.handle(msg, _contexts[name])))
        outputs += [out.model_dump_json() for out in produced]
    return outputs, chunks


def parse(uploaded: str) -> list[str]:
    """doc.uploaded → doc.parsed."""
    return run_stage("parse", [uploaded])[0]


def chunk(parsed: list[str]) -> list[str]:
    """doc.parsed → every chunk batch of the document."""
    return run_stage("chunk", parsed)[0]


def embed(batches: list[str]) -> list[str]:
    """Every chunk batch of the document → embedded batches."""
    return run_stage("embed", batches)[0]


def index(batches: list[str]) -> int:
    """Write every embedded batch; the chunk count is the chain's result."""
    return run_stage("index", batches)[1]


# Only the last task's result travels back to the client; intermediate results ride the chain.
parse_task = app.task(parse, name="bench.parse", ignore_result=True)
chunk_task = app.task(chunk, name="bench.chunk", ignore_result=True)
embed_task = app.task(embed, name="bench.embed", ignore_result=True)
index_task = app.task(index, name="bench.index")
