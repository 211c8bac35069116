"""The raw model limit: `model.encode` over every chunk of the corpus in one process."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stages.backends.embedder import SentenceTransformerEmbedder

BATCH_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class RawModel:
    """Chunks per second at each batch size tried, and the best of them."""

    chunks: int
    chunks_per_s: dict[int, float]
    # CPU seconds this process spent per batch size: the model's cost, whatever else runs.
    cpu_s: dict[int, float]

    @property
    def best_batch_size(self) -> int:
        """The batch size that gave the most chunks per second."""
        return max(self.chunks_per_s, key=lambda b: self.chunks_per_s[b])

    @property
    def best_chunks_per_s(self) -> float:
        """The model's limit on this machine: its best rate."""
        return self.chunks_per_s[self.best_batch_size]


def measure(texts: list[str], batch_sizes: tuple[int, ...] = BATCH_SIZES) -> RawModel:
    """Encode all `texts` once per batch size, after a warm-up, with Sluice's own model loader."""
    embedder = SentenceTransformerEmbedder(None, "auto", max(batch_sizes))
    model = embedder.model
    # The first calls pay for lazy initialisation (thread pools, kernels): not the model's speed.
    model.encode(texts[:128], batch_size=64, show_progress_bar=False)
    rates: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for size in batch_sizes:
        started, cpu_started = time.perf_counter(), time.process_time()
        model.encode(
            texts,
            batch_size=size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        rates[size] = len(texts) / (time.perf_counter() - started)
        cpu[size] = time.process_time() - cpu_started
        print(f"  raw model, batch {size}: {rates[size]:.1f} chunks/s", flush=True)
    return RawModel(chunks=len(texts), chunks_per_s=rates, cpu_s=cpu)
