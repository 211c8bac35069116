"""What an embedded batch costs on the wire, vectors as JSON lists (version 1) against packed
(version 2): body bytes, and the milliseconds to write and read one batch.

Both shapes are measured side by side in one process: version 1 by a faithful copy of the old
models below, version 2 by the real ones (contracts/messages.py). A batch is what the chunk
stage makes: `chunks` chunks of about 250 tokens of words each, with random unit vectors
(float32, as the embedder gives them). `python -m bench.vector_codec` prints the figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.answer_time import paragraph
from contracts.messages import (
    Chunk,
    EmbeddedBatch,
    PackedVectors,
    _Batch,
    chunk_id,
)

# About 250 wordpiece tokens: the word list's words take some 1.3 tokens each.
WORDS_PER_CHUNK = 190


class OldEmbeddedChunk(Chunk):
    """Version 1's chunk, as the release before packing declared it."""

    vector: list[float]


class OldEmbeddedBatch(_Batch):
    """Version 1's embedded batch: the same envelope and batch fields, a vector per chunk."""

    chunks: list[OldEmbeddedChunk]


@dataclass(frozen=True)
class VectorCodec:
    """One batch's body size and its write and read times (median of `repeat`), both shapes."""

    chunks: int  # chunks in the batch (64)
    dimensions: int  # 384
    json_bytes: int  # body size, version 1 (vectors as JSON lists), the old shape
    packed_bytes: int  # body size, version 2
    json_encode_ms: float  # per batch: the old model's model_dump_json
    json_decode_ms: float  # per batch: the old model's model_validate_json (the index's cost)
    # Per batch: packing the matrix, building the message and its model_dump_json (more than
    # the old figure counts, which leaves out building the message).
    packed_encode_ms: float
    # model_validate_json of the v2 body, plus unpacking to the matrix the index writes.
    packed_decode_ms: float


def _median_ms(work: Callable[[], Any], repeat: int) -> float:
    """The median wall time of `work`, in milliseconds, after one warm-up call."""
    work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _envelope(chunks: int) -> dict[str, Any]:
    return {
        "job_id": "0" * 32,
        "document_id": "1" * 32,
        "collection": "default",
        "filename": "report.pdf",
        "batch_index": 0,
        "batch_count": 1,
        "chunks_total": chunks,
    }


def measure(
    *, chunks: int = 64, dimensions: int = 384, repeat: int = 50, seed: int = 0
) -> VectorCodec:
    """Body sizes and per-batch write and read times of one batch in both shapes."""
    rng = random.Random(seed)
    texts = [paragraph(rng, WORDS_PER_CHUNK) for _ in range(chunks)]
    made = [
        Chunk(chunk_id=chunk_id("1" * 32, "2" * 64, i), chunk_index=i, text=t, page=1 + i // 4)
        for i, t in enumerate(texts)
    ]
    rows = np.random.default_rng(seed).standard_normal((chunks, dimensions))
    matrix = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    envelope = _envelope(chunks)

    # What the old embed stage built: float32 vectors as Python floats, chunk by chunk.
    old = OldEmbeddedBatch(
        **envelope,
        chunks=[
            OldEmbeddedChunk(**c.model_dump(), vector=v)
            for c, v in zip(made, matrix.tolist(), strict=True)
        ],
    )
    old_body = old.model_dump_json()

    def packed() -> str:
        vectors = PackedVectors.pack(matrix)
        return EmbeddedBatch(**envelope, chunks=made, vectors=vectors).model_dump_json()

    new_body = packed()

    def packed_read() -> np.ndarray:
        return EmbeddedBatch.model_validate_json(new_body).matrix

    # Both shapes carry the same vectors: the comparison is of codecs, not of contents.
    assert np.array_equal(EmbeddedBatch.model_validate_json(old_body).matrix, matrix)
    assert np.array_equal(EmbeddedBatch.model_validate_json(new_body).matrix, matrix)
    return VectorCodec(
        chunks=chunks,
        dimensions=dimensions,
        json_bytes=len(old_body.encode()),
        packed_bytes=len(new_body.encode()),
        json_encode_ms=_median_ms(old.model_dump_json, repeat),
        json_decode_ms=_median_ms(lambda: OldEmbeddedBatch.model_validate_json(old_body), repeat),
        packed_encode_ms=_median_ms(packed, repeat),
        packed_decode_ms=_median_ms(packed_read, repeat),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--dimensions", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = measure(
        chunks=args.chunks, dimensions=args.dimensions, repeat=args.repeat, seed=args.seed
    )
    for name, value in asdict(result).items():
        print(f"{name:>18}  {value:.3f}" if isinstance(value, float) else f"{name:>18}  {value}")
    print(f"{'bytes ratio':>18}  {result.json_bytes / result.packed_bytes:.2f}x")
    print(f"{'decode speed-up':>18}  {result.json_decode_ms / result.packed_decode_ms:.1f}x")
