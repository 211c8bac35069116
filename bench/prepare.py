"""Cut the corpus into Sluice's own chunks, in process, and note what each stage moves and costs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.corpus import Document
from bench.inproc import InProcess, bench_settings
from contracts.messages import ChunkBatch, DocumentParsed, EmbeddedBatch, PackedVectors
from stages.backends.protocols import embedding_text

# The zero-cost embedder answers this unit vector for every text (see bench/passthrough.py).
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


@dataclass(frozen=True)
class Recording:
    """Per file name, what the real parse and chunk stages published for it."""

    parsed: dict[str, DocumentParsed]
    chunked: dict[str, list[ChunkBatch]]

    def dump(self, path: Path) -> None:
        """Write the recording as JSON."""
        path.write_text(
            json.dumps(
                {
                    name: {
                        "parsed": self.parsed[name].model_dump(mode="json"),
                        "chunked": [b.model_dump(mode="json") for b in self.chunked[name]],
                    }
                    for name in self.parsed
                }
            )
        )

    @classmethod
    def load(cls, path: Path) -> Recording:
        """Read a recording `dump` wrote."""
        raw: dict[str, Any] = json.loads(path.read_text())
        return cls(
            parsed={n: DocumentParsed.model_validate(r["parsed"]) for n, r in raw.items()},
            chunked={
                n: [ChunkBatch.model_validate(b) for b in r["chunked"]] for n, r in raw.items()
            },
        )


@dataclass
class Prepared:
    """Every chunk text of the corpus (as the model sees it) and per-document plans."""

    texts: list[str] = field(default_factory=list)
    chunks_per_document: dict[str, int] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)
    recording: Recording = field(default_factory=lambda: Recording({}, {}))
    parse_s: float = 0.0
    chunk_s: float = 0.0


def zero_cost_embedded(batch: ChunkBatch) -> EmbeddedBatch:
    """The embedded batch Sluice publishes for `batch` when every vector is the constant one."""
    vectors = PackedVectors.pack([CONSTANT_VECTOR for _ in batch.chunks], DIMENSIONS)
    # Not the chunk batch's version: an embedded batch has its own.
    fields = batch.model_dump(exclude={"chunks", "version"})
    return EmbeddedBatch(**fields, chunks=batch.chunks, vectors=vectors)


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
            (parsed,) = passage.outputs["parse"]
            assert isinstance(parsed, DocumentParsed)
            out.recording.parsed[doc.name] = parsed
            out.recording.chunked[doc.name] = batches
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
