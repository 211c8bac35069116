"""Sluice's stage runtime with handlers that do no work: the Sluice side of pipeline overhead.

`python -m bench.passthrough STAGE` serves one stage exactly as `sluice stage STAGE` does (the
same runtime: validation, confirms, job events, metrics, logs, prefetch and concurrency), but
parse and chunk answer the messages the real stages made for that document (recorded by
bench/prepare.py in the file `BENCH_RECORDING` names), embed runs the real embed handler and
its shared model calls with a zero-cost embedder, and index writes nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.prepare import CONSTANT_VECTOR, DIMENSIONS, Recording
from contracts import pipeline
from contracts.messages import (
    DocumentParsed,
    DocumentUploaded,
    EmbeddedBatch,
    Message,
)
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from contracts.settings import Settings
from stages.builtin import embed
from stages.runtime.worker import run_with
from stages.stage import Stage

RECORDING_ENV = "BENCH_RECORDING"


class ZeroCostEmbedder:
    """An embedder that costs nothing: the same unit vector for every text."""

    dimensions = DIMENSIONS

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """The constant vector, once per text, as a matrix (what a real embedder answers)."""
        return np.tile(np.asarray(CONSTANT_VECTOR, dtype=np.float32), (len(texts), 1))


def _recording() -> Recording:
    return Recording.load(Path(os.environ[RECORDING_ENV]))


async def _start_parse(settings: Settings) -> Recording:
    return _recording()


async def _parse(msg: DocumentUploaded, recording: Recording) -> list[Message]:
    return [recording.parsed[msg.filename].model_copy(update=msg.envelope())]


async def _chunk(msg: DocumentParsed, recording: Recording) -> list[Message]:
    return [b.model_copy(update=msg.envelope()) for b in recording.chunked[msg.filename]]


async def _start_embed(settings: Settings) -> embed.EmbedContext:
    return embed.context_for(
        ZeroCostEmbedder(),
        max_items=settings.embed_call_chunks,
        max_wait_s=settings.embed_batch_wait_s,
    )


async def _start_index(settings: Settings) -> None:
    return None


async def _index(msg: EmbeddedBatch, ctx: None) -> list[Message]:
    return []


STAGES_WITHOUT_WORK: dict[str, Stage[Any, Any]] = {
    "parse": Stage(spec=pipeline.PARSE, startup=_start_parse, handle=_parse),
    "chunk": Stage(spec=pipeline.CHUNK, startup=_start_parse, handle=_chunk),
    "embed": Stage(spec=pipeline.EMBED, startup=_start_embed, handle=embed.handle),
    "index": Stage(spec=pipeline.INDEX, startup=_start_index, handle=_index),
}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
        sys.exit(f"usage: python -m bench.passthrough {{{','.join(STAGES)}}}")
    run_with(STAGES_WITHOUT_WORK[sys.argv[1]], Settings())
