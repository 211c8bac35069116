"""CPU seconds the real parse and chunk handlers spend on the corpus, each stage on its own.

Wall seconds on a shared machine say more about the neighbours than about Sluice; CPU seconds
say what a stage costs. The chunk stage works in this process (its threads included, which
`time.process_time` counts); parse works in its sandbox's worker processes, so their CPU is
added: live workers read through psutil, recycled ones through this process's reaped children.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped, import-not-found, unused-ignore]

from bench.corpus import corpus
from bench.inproc import InProcess, bench_settings
from contracts.messages import ChunkBatch, Message


@dataclass(frozen=True)
class StageCpu:
    """CPU seconds of parse and of chunk over a corpus, and the chunks they made."""

    documents: int
    chunks: int
    parse_cpu_s: float
    chunk_cpu_s: float

    @property
    def parse_chunks_per_cpu_s(self) -> float:
        """Chunks' worth of documents parse gets through per CPU second."""
        return self.chunks / self.parse_cpu_s if self.parse_cpu_s else 0.0

    @property
    def chunk_chunks_per_cpu_s(self) -> float:
        """Chunks the chunk stage cuts per CPU second."""
        return self.chunks / self.chunk_cpu_s if self.chunk_cpu_s else 0.0


class _Reading:
    """CPU seconds so far: this process's before and after looking at its children, and theirs."""

    def __init__(self) -> None:
        self.own_before = time.process_time()
        reaped = os.times()
        self.children = reaped.children_user + reaped.children_system
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                self.children += times.user + times.system
        # Finding the children reads every process in /proc: on a busy machine that costs
        # more than some stages, so it is left out of both intervals it falls between.
        self.own_after = time.process_time()

    def since(self, earlier: _Reading) -> float:
        """CPU seconds spent between `earlier` and this reading, less the readings' own."""
        return self.own_before - earlier.own_after + self.children - earlier.children


async def _measure(scale: float, work_dir: Path) -> StageCpu:
    docs = corpus(scale)
    pipeline = await InProcess.start(bench_settings(work_dir), ["parse", "chunk"])
    (parse, parse_ctx), (chunk, chunk_ctx) = pipeline.stages["parse"], pipeline.stages["chunk"]
    parse_s = chunk_s = 0.0
    chunks = 0
    try:
        for doc in docs:
            uploaded = pipeline.uploaded(doc.name, doc.data, "stage-cpu")
            started = _Reading()
            parsed: list[Message] = list(await parse.handle(uploaded, parse_ctx))
            parsed_at = _Reading()
            batches: list[Message] = []
            for msg in parsed:
                batches.extend(await chunk.handle(msg, chunk_ctx))
            parse_s += parsed_at.since(started)
            chunk_s += _Reading().since(parsed_at)
            chunks += sum(len(b.chunks) for b in batches if isinstance(b, ChunkBatch))
    finally:
        await pipeline.close()
    return StageCpu(len(docs), chunks, parse_s, chunk_s)


def measure(scale: float = 1.0, *, work_dir: Path) -> StageCpu:
    """Parse and chunk the corpus at `scale` in this process, with stores under `work_dir`."""
    return asyncio.run(_measure(scale, work_dir))


def main() -> None:
    """Print the CPU each stage spent on the corpus at scale 1."""
    with tempfile.TemporaryDirectory(prefix="sluice-stage-cpu-") as tmp:
        cpu = measure(work_dir=Path(tmp))
    print(f"documents {cpu.documents}, chunks {cpu.chunks}")
    print(
        f"parse: {cpu.parse_cpu_s:.3f} CPU-s, {cpu.parse_chunks_per_cpu_s:,.0f} chunks/CPU-s, "
        f"{1000 * cpu.parse_cpu_s / max(cpu.chunks, 1):.3f} ms/chunk"
    )
    print(
        f"chunk: {cpu.chunk_cpu_s:.3f} CPU-s, {cpu.chunk_chunks_per_cpu_s:,.0f} chunks/CPU-s, "
        f"{1000 * cpu.chunk_cpu_s / max(cpu.chunks, 1):.3f} ms/chunk"
    )


if __name__ == "__main__":
    main()
