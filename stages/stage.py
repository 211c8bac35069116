"""What a stage module declares: its place in the pipeline, its resources, its pure handler.

A stage module reads like a page: a `STAGE = Stage(spec=..., startup=..., handle=...)` value and
an `async def handle(msg, ctx)`. The runtime (stages/runtime/) owns everything about channels,
acks, retries and events. A module from outside Sluice plugs in the same way, by settings
alone: `SLUICE_STAGE_MODULES=name=package.module` and `name` in `SLUICE_STAGES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from contracts.messages import Message
from contracts.pipeline import PipelineError, StageSpec
from contracts.settings import Settings

In = TypeVar("In", bound=Message)
Ctx = TypeVar("Ctx")


async def _nothing_to_close(ctx: object) -> None:
    return None


@dataclass(frozen=True)
class Stage(Generic[In, Ctx]):
    """A stage: `startup` builds its resources once; `handle` turns one message into outputs.

    `handle` raises `Permanent` for bad input and `Transient` for a dependency that is briefly
    down; anything else is treated as transient too (with a bounded number of attempts).
    """

    spec: StageSpec
    startup: Callable[[Settings], Awaitable[Ctx]]
    handle: Callable[[In, Ctx], Awaitable[Sequence[Message]]]
    shutdown: Callable[[Ctx], Awaitable[None]] = _nothing_to_close

    @property
    def name(self) -> str:
        """The stage's name, as in `SLUICE_STAGES`."""
        return self.spec.name

    @property
    def input(self) -> type[Message]:
        """The message model this stage consumes."""
        return self.spec.consumes


def load_stage(name: str, settings: Settings) -> Stage[Any, Any]:
    """The `STAGE` of the module the pipeline names for `name` (built-in or plugged in)."""
    module = importlib.import_module(settings.pipeline.modules[settings.pipeline.spec(name).name])
    stage = getattr(module, "STAGE", None)
    if not isinstance(stage, Stage):
        raise PipelineError(f"module {module.__name__!r} has no `STAGE = Stage(...)`")
    return stage
