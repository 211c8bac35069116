"""What a stage module declares: its name, how to build its resources, and its pure handler.

A stage module reads like a page: a `Stage(...)` value and an `async def handle(msg, ctx)`.
The runtime (stages/runtime.py) owns everything about channels, acks, retries and events.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from contracts.messages import INPUT_OF, Message, StageName
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

    name: StageName
    startup: Callable[[Settings], Awaitable[Ctx]]
    handle: Callable[[In, Ctx], Awaitable[Sequence[Message]]]
    shutdown: Callable[[Ctx], Awaitable[None]] = _nothing_to_close

    @property
    def input(self) -> type[Message]:
        """The message model this stage consumes."""
        return INPUT_OF[self.name]


def load_stage(name: StageName) -> Stage[Any, Any]:
    """The `STAGE` declared by module `stages.<name>`."""
    module = importlib.import_module(f"stages.builtin.{name}")
    stage: Stage[Any, Any] = module.STAGE
    return stage
