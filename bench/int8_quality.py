"""INT8 against fp32 on the corpus's own chunks: chunks/s of each backend, and what INT8 costs.

`python -m bench.int8_quality [--scale 1] [--queries 200]`. Torch (sentence-transformers, fp32),
the fp32 ONNX export and its INT8 quantisation embed every chunk in this one process, one after
another, each after a warm-up call and each on every core the process may use, as the embed
stage would run them. Quality is measured twice: the cosine of each INT8 vector to the torch
vector of the same text, and retrieval, where a query is a dozen words from the middle of a
chunk and it is found when its chunk is among the 3 nearest of all chunks (recall@3).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.corpus import corpus
from bench.prepare import prepare
from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.onnx_embedder import INT8_RECIPE, OnnxEmbedder

# Each backend's best over these: the stage's default forward pass (16) and a larger one.
BATCH_SIZES = (16, 64)
QUERY_WORDS = 12
TOP_K = 3

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Int8Quality:
    """Speed of the three backends on the same texts, and INT8's agreement with torch fp32."""

    chunks: int  # texts embedded
    queries: int
    torch_fp32_chunks_per_s: float  # best of the batch sizes tried
    onnx_fp32_chunks_per_s: float
    int8_chunks_per_s: float
    cosine_mean: float  # int8 vs torch fp32, same texts
    cosine_min: float
    recall_at_3_fp32: float  # 0..1
    recall_at_3_int8: float
    weight_type: str  # e.g. "QInt8 per-channel"

    @property
    def speedup(self) -> float:
        """INT8 chunks/s over torch fp32 chunks/s."""
        return self.int8_chunks_per_s / self.torch_fp32_chunks_per_s


def query_span(text: str, words: int = QUERY_WORDS) -> str:
    """`words` consecutive words from the middle of `text` (all of it if it is shorter)."""
    tokens = text.split()
    start = max(0, (len(tokens) - words) // 2)
    return " ".join(tokens[start : start + words])


def make_queries(texts: list[str], count: int, seed: str) -> tuple[list[str], list[int]]:
    """`count` seeded queries cut from distinct chunks, and the index of each one's chunk."""
    sources = random.Random(seed).sample(range(len(texts)), min(count, len(texts)))
    return [query_span(texts[i]) for i in sources], sources


def recall_at_k(
    chunks: Matrix, queries: Matrix, sources: list[int], texts: list[str], k: int = TOP_K
) -> float:
    """The fraction of queries whose source chunk is among the `k` nearest by cosine.

    A chunk whose text is the source's own (a repeated boilerplate chunk) counts as it: the
    two vectors are the same, so which of them ranks first says nothing about the model.
    """
    nearest = np.argsort(-(queries @ chunks.T), axis=1)[:, :k]
    hits = sum(
        any(texts[j] == texts[source] for j in row)
        for row, source in zip(nearest, sources, strict=True)
    )
    return hits / len(sources)


def best_rate(
    name: str,
    embedder: SentenceTransformerEmbedder | OnnxEmbedder,
    texts: list[str],
    batch_sizes: tuple[int, ...],
) -> tuple[float, Matrix]:
    """The best chunks/s over `batch_sizes` embedding all `texts`, and the vectors it gave."""
    # The first call pays for lazy initialisation (thread pools, allocators).
    embedder.embed(texts[:64])
    best, vectors = 0.0, np.empty((0, 0), dtype=np.float32)
    for size in batch_sizes:
        embedder.batch_size = size
        started, cpu_started = time.perf_counter(), time.process_time()
        vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
        rate = len(texts) / (time.perf_counter() - started)
        # Per CPU-second of this process: what moves least when other work shares the cores.
        per_cpu_s = len(texts) / (time.process_time() - cpu_started)
        print(
            f"  {name}, batch {size}: {rate:.1f} chunks/s, {per_cpu_s:.1f} chunks per CPU-s",
            flush=True,
        )
        best = max(best, rate)
    return best, vectors


def measure(
    texts: list[str],
    *,
    queries: int = 200,
    seed: str = "int8",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Int8Quality:
    """Time torch fp32, ONNX fp32 and ONNX INT8 on `texts`, then compare INT8 with torch."""
    asked, sources = make_queries(texts, queries, seed)
    torch_model = SentenceTransformerEmbedder(None, "cpu", batch_sizes[0])
    torch_rate, reference = best_rate("torch fp32", torch_model, texts, batch_sizes)
    torch_queries = np.asarray(torch_model.embed(asked), dtype=np.float32)
    del torch_model
    onnx_rate, _ = best_rate("onnx fp32", OnnxEmbedder(None, batch_sizes[0]), texts, batch_sizes)
    int8 = OnnxEmbedder(None, batch_sizes[0], quantized=True)
    int8_rate, quantized = best_rate("onnx int8", int8, texts, batch_sizes)
    cosines = (quantized * reference).sum(axis=1)
    return Int8Quality(
        chunks=len(texts),
        queries=len(asked),
        torch_fp32_chunks_per_s=torch_rate,
        onnx_fp32_chunks_per_s=onnx_rate,
        int8_chunks_per_s=int8_rate,
        cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()),
        recall_at_3_fp32=recall_at_k(reference, torch_queries, sources, texts),
        recall_at_3_int8=recall_at_k(quantized, int8.embed(asked), sources, texts),
        weight_type=INT8_RECIPE.describe(),
    )


def main() -> None:
    """Cut the generated corpus into chunks as Sluice does, measure, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="corpus size factor")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="sluice-int8-") as tmp:
        texts = asyncio.run(prepare(corpus(args.scale), Path(tmp))).texts
    print(f"{len(texts)} chunks; load average before {', '.join(load_before)}", flush=True)
    q = measure(texts, queries=args.queries)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\nweight type: {q.weight_type}\n"
        f"chunks/s: torch fp32 {q.torch_fp32_chunks_per_s:.1f}, onnx fp32 "
        f"{q.onnx_fp32_chunks_per_s:.1f}, int8 {q.int8_chunks_per_s:.1f} "
        f"({q.speedup:.2f}x torch)\n"
        f"cosine int8 vs torch: mean {q.cosine_mean:.5f}, min {q.cosine_min:.5f}\n"
        f"recall@3 over {q.queries} queries: fp32 {q.recall_at_3_fp32:.3f}, "
        f"int8 {q.recall_at_3_int8:.3f}\n"
        f"load average after {', '.join(load_after)}"
    )


if __name__ == "__main__":
    main()
