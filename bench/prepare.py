"""Cut the corpus into Sluice's own chunks, in process, and note what each stage moves and costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.corpus import Document
from bench.inproc import InProcess, bench_settings
from contracts.messages import ChunkBatch, EmbeddedBatch, EmbeddedChunk
from stages.embed import embedding_text

# The zero-cost embedder answers this unit vector for every text (see bench/zero_embedder.py).
DIMENSIONS = 384
CONSTANT_VECTOR = [1.0] + [0.0] * (DIMENSIONS - 1)


@dataclass(frozen=True)
class Plan:
    """The data-plane messages one document makes Sluice publish, as body sizes in bytes."""

    uploaded: int
    parsed: int
    chunk_batches: tuple[int, ...]
    embedded_batches: tuple[int, ...]

    @property
    def messages(self) -> int:
        """Messages through the four stage queues for this document."""
        return 2 + len(self.chunk_batches) + len(self.embedded_batches)


@dataclass
class Prepared:
    """Every chunk text of the corpus (as the model sees it) and per-document plans."""

    texts: list[str] = field(default_factory=list)
    chunks_per_document: dict[str, int] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)
    parse_s: float = 0.0
    chunk_s: float = 0.0


def zero_cost_embedded(batch: ChunkBatch) -> EmbeddedBatch:
    """The embedded batch Sluice publishes for `batch` when every vector is the constant one."""
    chunks = [EmbeddedChunk(**c.model_dump(), vector=CONSTANT_VECTOR) for c in batch.chunks]
    return EmbeddedBatch(**batch.model_dump(exclude={"chunks"}), chunks=chunks)


async def prepare(docs: list[Document], work_dir: Path) -> Prepared:
    """Run the real parse and chunk handlers over every document, one after another."""
    pipeline = await InProcess.start(bench_settings(work_dir), ["parse", "chunk"])
    out = Prepared()
    try:
        for doc in docs:
            uploaded = pipeline.uploaded(doc.name, doc.data, "prepare")
            passage = await pipeline.run(uploaded)
            out.parse_s += passage.seconds["parse"]
            out.chunk_s += passage.seconds["chunk"]
            batches = [b for b in passage.outputs["chunk"] if isinstance(b, ChunkBatch)]
            out.texts += [embedding_text(c.heading, c.text) for b in batches for c in b.chunks]
            out.chunks_per_document[doc.name] = passage.chunks
            out.plans.append(
                Plan(
                    uploaded=len(uploaded.model_dump_json()),
                    parsed=len(passage.outputs["parse"][0].model_dump_json()),
                    chunk_batches=tuple(len(b.model_dump_json()) for b in batches),
                    embedded_batches=tuple(
                        len(zero_cost_embedded(b).model_dump_json()) for b in batches
                    ),
                )
            )
    finally:
        await pipeline.close()
    return out
