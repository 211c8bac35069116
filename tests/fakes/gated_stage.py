"""TEST DOUBLE: a real stage (the first argument), except that a message waits at a gate
before the stage's own handler sees it: a file (`SLUICE_TEST_GATE`, where `{stage}` is the
stage's name) that the test creates to let the work go on. Batches numbered below
`SLUICE_TEST_GATE_FROM_BATCH` (0 unless set) pass without waiting. The first message to
wait creates `<gate>.held`, so the test knows the stage holds work it has not finished.

Run as a stage process: `python tests/fakes/gated_stage.py embed` (settings from SLUICE_*).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from contracts.messages import Message
from contracts.settings import Settings
from stages.builtin import chunk, embed, index, parse
from stages.runtime.worker import run_with
from stages.stage import Stage

GATE_ENV = "SLUICE_TEST_GATE"
FROM_BATCH_ENV = "SLUICE_TEST_GATE_FROM_BATCH"
REAL: dict[str, Stage[Any, Any]] = {
    s.name: s for s in (parse.STAGE, chunk.STAGE, embed.STAGE, index.STAGE)
}


def held_marker(gate: Path) -> Path:
    """The file the double creates once a message waits at `gate`."""
    return gate.with_name(gate.name + ".held")


def gated(stage: Stage[Any, Any]) -> Stage[Any, Any]:
    """`stage`, its handler behind the gate."""

    async def handle(msg: Any, ctx: Any) -> Sequence[Message]:
        gate = Path(os.environ[GATE_ENV].format(stage=stage.name))
        if msg.unit()[0] >= int(os.environ.get(FROM_BATCH_ENV, "0")) and not gate.exists():
            held_marker(gate).touch()
            await opened(gate)
        return await stage.handle(msg, ctx)

    return replace(stage, handle=handle)


async def opened(gate: Path) -> None:
    """Return once `gate` exists (a file the test creates: there is no event to wait on)."""
    while True:
        if gate.exists():
            return
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    run_with(gated(REAL[sys.argv[1]]), Settings())
