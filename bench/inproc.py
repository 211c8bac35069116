"""The four Sluice stage handlers called in one process, one after another, as plain functions.

This is what the baselines share with Sluice: exactly the same `startup` and `handle` of each
stage, only without a broker between them. `chunk_rates` times the stages that take chunk
batches (the optional enrich, and embed) the same way, for the report's enrich-vs-embed row.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from contracts.messages import ChunkBatch, DocumentUploaded, Message, StageName
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.formats import sniff
from stages.stage import Stage, load_stage

# The pipeline with the optional enrich stage, so its handler can be loaded and timed.
ENRICHED_STAGES = "parse,chunk,enrich,embed,index"


@contextmanager
def clean_environment(**env: str) -> Iterator[None]:
    """`os.environ` without the caller's `SLUICE_*` settings, plus `env`, for the block."""
    # The benchmark measures Sluice's defaults, never whatever the user has exported.
    kept = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    with mock.patch.dict(os.environ, {**kept, **env}, clear=True):
        yield


def bench_settings(data_dir: Path, **env: str) -> Settings:
    """Sluice's default settings with the data under `data_dir` (and `SLUICE_*` overrides)."""
    with clean_environment(SLUICE_DATA_DIR=str(data_dir), **env):
        return Settings()


@dataclass
class Passage:
    """What one document left behind at each stage, and the seconds each stage took."""

    outputs: dict[StageName, list[Message]] = field(default_factory=dict)
    seconds: dict[StageName, float] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        """How many chunks the chunk stage cut the document into."""
        return sum(m.unit()[2] for m in self.outputs.get("chunk", []))


class InProcess:
    """Contexts of some stages, built once by each stage's own `startup`."""

    def __init__(self, settings: Settings, stages: dict[StageName, tuple[Stage[Any, Any], Any]]):
        self.settings = settings
        self.stages = stages
        self.blobs = LocalBlobStore(settings.blob_dir)

    @classmethod
    async def start(cls, settings: Settings, names: Sequence[StageName] = STAGES) -> InProcess:
        """Run the `startup` of each named stage (the embed model loads here)."""
        stages: dict[StageName, tuple[Stage[Any, Any], Any]] = {}
        for name in names:
            stage = load_stage(name, settings)
            stages[name] = (stage, await stage.startup(settings))
        return cls(settings, stages)

    async def close(self) -> None:
        """Run each stage's `shutdown` (the parse workers stop here)."""
        for stage, ctx in self.stages.values():
            await stage.shutdown(ctx)

    def uploaded(self, filename: str, data: bytes, collection: str) -> DocumentUploaded:
        """Store an upload's bytes and describe it as the gateway would."""
        sha256 = self.blobs.put_bytes(data)
        return DocumentUploaded(
            job_id=uuid.uuid4().hex,
            document_id=uuid.uuid4().hex,
            collection=collection,
            filename=filename,
            blob_sha256=sha256,
            content_type=self._sniff(sha256),
            size_bytes=len(data),
        )

    def _sniff(self, sha256: str) -> str:
        with self.blobs.as_file(sha256) as path:
            return sniff(path)

    async def run(self, msg: Message) -> Passage:
        """Feed `msg` through every stage held, in order, each output into the next handler."""
        passage = Passage()
        current: list[Message] = [msg]
        for name, (stage, ctx) in self.stages.items():
            started = time.perf_counter()
            produced: list[Message] = []
            for item in current:
                produced.extend(await stage.handle(item, ctx))
            passage.seconds[name] = time.perf_counter() - started
            passage.outputs[name] = produced
            current = produced
        return passage


@dataclass(frozen=True)
class ChunkRate:
    """Handler seconds one stage spent on the corpus's chunk batches, and the chunks in them."""

    seconds: float
    chunks: int

    @property
    def chunks_per_s(self) -> float:
        """Chunks this stage's handler gets through per second, one batch in hand at a time."""
        return self.chunks / self.seconds if self.seconds else 0.0


async def chunk_rates(
    data_dir: Path, batches: Sequence[ChunkBatch], names: Sequence[StageName] = ("enrich", "embed")
) -> dict[StageName, ChunkRate]:
    """Feed every chunk batch through the named stages in order, timing each stage's handler."""
    pipeline = await InProcess.start(bench_settings(data_dir, SLUICE_STAGES=ENRICHED_STAGES), names)
    seconds = dict.fromkeys(names, 0.0)
    try:
        # A first batch warms up what the first call pays for (thread pools, kernels, caches).
        if batches:
            await pipeline.run(batches[0])
        for batch in batches:
            passage = await pipeline.run(batch)
            for name in names:
                seconds[name] += passage.seconds[name]
    finally:
        await pipeline.close()
    chunks = sum(len(b.chunks) for b in batches)
    return {name: ChunkRate(seconds[name], chunks) for name in names}
