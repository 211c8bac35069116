"""ONNX Runtime (fp32, INT8) against sentence-transformers on CPU: chunks/s, CPU-seconds, agreement.

`python -m bench.onnx_compare [--texts 1500] [--reps 2]`. Not part of the test suite. Every
backend embeds the same generated chunk texts (150-256 tokens) at each batch size, alternating
so that load from other work on a shared machine falls on all alike. CPU seconds of this
process (all threads) are reported beside wall time: they move much less with that load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.answer_time import paragraph
from stages.backends.embedder import SentenceTransformerEmbedder, packaged_model_dir
from stages.backends.onnx_embedder import OnnxEmbedder, export_onnx, load_tokenizer, open_session
from stages.backends.protocols import Embedder

# Chunks as the chunk stage cuts them: at most 256 model tokens, most of them near the top.
MIN_TOKENS, MAX_TOKENS = 150, 256


def chunk_texts(count: int) -> list[str]:
    """`count` seeded English-like texts, each cut to 150-256 tokens (with [CLS] and [SEP])."""
    tokenizer = load_tokenizer(packaged_model_dir())
    tokenizer.no_truncation()
    rng = random.Random("onnx-compare")
    texts: list[str] = []
    for _ in range(count):
        text = paragraph(rng, 260)
        target = rng.randint(MIN_TOKENS, MAX_TOKENS) - 2
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        texts.append(text[: offsets[min(target, len(offsets)) - 1][1]])
    return texts


@dataclass
class Runs:
    """Wall and CPU seconds of every run of one backend at one batch size."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def timed(embed: Callable[[list[str]], object], texts: list[str], runs: Runs) -> None:
    """Embed `texts` once, adding the wall and process CPU seconds it took to `runs`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    embed(texts)
    runs.wall_s.append(time.perf_counter() - started)
    runs.cpu_s.append(time.process_time() - cpu_started)


def fused_copy(embedder: OnnxEmbedder, work_dir: Path) -> OnnxEmbedder:
    """The same embedder on the export rewritten by ONNX Runtime's BERT fusions (Attention, ...)."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused_path = work_dir / "fused.onnx"
    optimize_model(
        str(embedder.model_path), model_type="bert", num_heads=12, hidden_size=384
    ).save_model_to_file(str(fused_path))
    fused = OnnxEmbedder(embedder.model_dir, embedder.batch_size, embedder.model_path.parent.parent)
    fused.model_path, fused.session = fused_path, open_session(fused_path)
    return fused


def vectors(embedder: Embedder, texts: list[str]) -> npt.NDArray[np.float64]:
    """The embedder's vectors for `texts` as one array."""
    return np.array(embedder.embed(texts), dtype=np.float64)


def main() -> None:
    """Measure, then print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[32, 64, 128]
    )
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-graph variant")
    args = parser.parse_args()

    texts = chunk_texts(args.texts)
    lengths = [len(e.ids) for e in load_tokenizer(packaged_model_dir()).encode_batch(texts)]
    print(
        f"{len(texts)} texts, tokens min/median/max {min(lengths)}/"
        f"{statistics.median(lengths):.0f}/{max(lengths)}; cores {len(os.sched_getaffinity(0))};"
        f" load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    torch_model = SentenceTransformerEmbedder(None, "cpu", 64)
    with tempfile.TemporaryDirectory(prefix="sluice-onnx-bench-") as tmp:
        work_dir = Path(tmp)
        # torch and transformers are imported by now: this is the export alone.
        started = time.perf_counter()
        path = export_onnx(packaged_model_dir(), work_dir / "cache")
        export_s = time.perf_counter() - started
        print(f"one-time export: {export_s:.1f} s, {path.stat().st_size / 1e6:.1f} MB", flush=True)
        onnx = OnnxEmbedder(None, 64, work_dir / "cache")
        backends: dict[str, SentenceTransformerEmbedder | OnnxEmbedder] = {
            "torch": torch_model,
            "onnx": onnx,
        }
        if not args.no_fused:
            backends["onnx+fused"] = fused_copy(onnx, work_dir)
        backends["onnx-int8"] = OnnxEmbedder(None, 64, work_dir / "cache", quantized=True)
        report(backends, texts, args.batch_sizes, args.reps)


def report(
    backends: dict[str, SentenceTransformerEmbedder | OnnxEmbedder],
    texts: list[str],
    batch_sizes: list[int],
    reps: int,
) -> None:
    """Time every backend at every batch size `reps` times, then print the tables."""
    for embedder in backends.values():
        # The first calls pay for lazy initialisation (thread pools, allocators).
        embedder.embed(texts[:64])
    runs = {(name, size): Runs() for name in backends for size in batch_sizes}
    for rep in range(reps):
        for size in batch_sizes:
            for name, embedder in backends.items():
                embedder.batch_size = size
                timed(embedder.embed, texts, runs[name, size])
                print(
                    f"  run {rep + 1}, batch {size:>3}, {name:<10}: "
                    f"{len(texts) / runs[name, size].wall_s[-1]:6.1f} chunks/s, "
                    f"{len(texts) / runs[name, size].cpu_s[-1]:6.1f} chunks/CPU-s",
                    flush=True,
                )

    def rates(seconds: list[float]) -> str:
        return " / ".join(f"{len(texts) / s:.1f}" for s in seconds)

    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| backend | batch | chunks/s (wall), each run | chunks per CPU-s, each run |")
    print("|---|---:|---:|---:|")
    for (name, size), r in runs.items():
        print(f"| {name} | {size} | {rates(r.wall_s)} | {rates(r.cpu_s)} |")

    print("\n| backend | best chunks/s | best chunks per CPU-s | CPU-s speed-up vs torch |")
    print("|---|---:|---:|---:|")
    torch_best = max(len(texts) / s for size in batch_sizes for s in runs["torch", size].cpu_s)
    for name in backends:
        wall = max(len(texts) / s for size in batch_sizes for s in runs[name, size].wall_s)
        cpu = max(len(texts) / s for size in batch_sizes for s in runs[name, size].cpu_s)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {cpu / torch_best:.2f}x |")

    for embedder in backends.values():
        embedder.batch_size = 64
    reference = vectors(backends["torch"], texts)
    print("\n| vs torch | cosine min | cosine mean | max abs difference |")
    print("|---|---:|---:|---:|")
    for name, embedder in backends.items():
        if name != "torch":
            got = vectors(embedder, texts)
            cosines = (got * reference).sum(axis=1)
            print(
                f"| {name} | {cosines.min():.7f} | {cosines.mean():.7f} | "
                f"{np.abs(got - reference).max():.1e} |"
            )


if __name__ == "__main__":
    main()
