"""`sluice stage NAME`: one process running one stage until SIGTERM or SIGINT.

A stop is honoured whenever it comes, with exit code 0. While the stage is still starting (its
model loading, RabbitMQ not answering yet) it holds no message, so it exits at once: waiting
for a model load in a thread, or for a connection attempt the broker never answers, would
hold the exit for as long as they take, and `sluice up` kills what does not stop in time.
Once it consumes, a stop drains: no more deliveries, the ones in hand finished and acked
(stages/runtime/runner.py), then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable
from types import FrameType
from typing import Any, TypeVar

from contracts.messages import StageName
from contracts.settings import Settings
from stages.infra import stage_metrics as metrics
from stages.infra import tracing
from stages.infra.broker import Broker
from stages.infra.logs import configure_logging
from stages.runtime.runner import StageRunner
from stages.stage import Stage, load_stage

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How long work cancelled by a stop may take to unwind (a coroutine awaiting a thread unwinds
# at once; the thread itself is not waited for).
_UNWIND_S = 2.0


def run_stage(name: StageName, settings: Settings) -> None:
    """Run one stage in the foreground; returns after a clean drain on SIGTERM/SIGINT."""
    exit_when_asked()
    settings.check()
    run_with(load_stage(name, settings), settings)


def run_with(stage: Stage[Any, Any], settings: Settings) -> None:
    """Run a stage declared anywhere (a benchmark's, a test's) as `run_stage` runs ours."""
    exit_when_asked()
    configure_logging(f"sluice-{stage.name}", settings.log_format, settings.log_level)
    tracing.setup_tracing(f"sluice-{stage.name}")
    os.nice(settings.stage_nice)
    with asyncio.Runner() as runner:
        if not runner.run(serve(stage, settings)):
            # Stopped while starting: nothing was taken, so nothing is left to hand back, and
            # what was still starting (a model loading in a thread, a connection attempt) is
            # not waited for, as closing the loop and the interpreter's exit would.
            logging.shutdown()
            os._exit(0)


def exit_when_asked() -> None:
    """Until `serve` takes the stop signals over, SIGTERM or SIGINT end the process at once
    with code 0 (nothing is in hand yet), instead of killing it by the signal."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _exit_at_once)


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


async def serve(
    stage: Stage[Any, Any], settings: Settings, stop: asyncio.Event | None = None
) -> bool:
    """Start the stage's resources and consumer; stop when `stop` is set or a signal arrives.

    Returns whether the stage got as far as consuming: False when it was stopped while it
    was starting, in which case what was still starting may be left running (a model loading
    in a thread, a half-made connection) for the caller to abandon.
    """
    name = stage.name
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    metrics.serve_metrics(settings.host, settings.stage(name).metrics_port)
    started = await until_stopped(stage.startup(settings), stop)
    if started is None:
        log.info("stage %s stopped while starting", name)
        return False
    ctx = started.result()
    broker = Broker(settings)
    try:
        log.info("stage %s started; connecting to RabbitMQ", name)
        connected = await until_stopped(broker.connect(), stop)
        if connected is None:
            log.info("stage %s stopped while connecting to RabbitMQ", name)
            return False
        connected.result()
        await StageRunner(stage, ctx, settings, broker).run(stop)
        return True
    finally:
        await broker.close()
        await stage.shutdown(ctx)
        log.info("stage %s stopped", name)


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> asyncio.Future[T] | None:
    """Run `work` unless `stop` comes first: returns its finished task, or None when `stop`
    came first (the work is then cancelled, and given `_UNWIND_S` to unwind)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task
    task.cancel()
    await asyncio.wait({task}, timeout=_UNWIND_S)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("work cancelled by a stop ended with %r", task.exception())
    return None
