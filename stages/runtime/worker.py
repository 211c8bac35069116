"""`sluice stage NAME`: one process running one stage until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

from contracts.messages import StageName
from contracts.settings import Settings
from stages.infra import stage_metrics as metrics
from stages.infra import tracing
from stages.infra.broker import Broker
from stages.infra.logs import configure_logging
from stages.runtime.runner import StageRunner
from stages.stage import Stage, load_stage

log = logging.getLogger(__name__)


def run_stage(name: StageName, settings: Settings) -> None:
    """Run one stage in the foreground; returns after a clean drain on SIGTERM/SIGINT."""
    settings.check()
    run_with(load_stage(name, settings), settings)


def run_with(stage: Stage[Any, Any], settings: Settings) -> None:
    """Run a stage declared anywhere (a benchmark's, a test's) as `run_stage` runs ours."""
    configure_logging(f"sluice-{stage.name}", settings.log_format)
    tracing.setup_tracing(f"sluice-{stage.name}")
    os.nice(settings.stage_nice)
    asyncio.run(serve(stage, settings))


async def serve(
    stage: Stage[Any, Any], settings: Settings, stop: asyncio.Event | None = None
) -> None:
    """Start the stage's resources and consumer; stop when `stop` is set or a signal arrives."""
    name = stage.name
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics.serve_metrics(settings.host, settings.stage(name).metrics_port)
    ctx = await stage.startup(settings)
    broker = Broker(settings)
    try:
        if await until_stopped(broker.connect(), stop):
            await StageRunner(stage, ctx, settings, broker).run(stop)
    finally:
        await broker.close()
        await stage.shutdown(ctx)
        log.info("stage %s stopped", name)


async def until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` comes first (a signal while waiting for the broker);
    returns whether the work finished."""
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()
    return True
