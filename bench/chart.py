"""The benchmark's bar chart (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib  # type: ignore[import-not-found, unused-ignore]

# Agg before pyplot is imported: the benchmark runs headless.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
from matplotlib.axes import Axes  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:
    from bench.report import Results


def _bars(ax: Axes, title: str, values: dict[str, float], unit: str, line: float | None) -> None:
    """One panel: labelled bars, an optional target line."""
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if line is not None:
        ax.axhline(line, color="#c44e52", linestyle="--", linewidth=1, label="target")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit, fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=15)


def chart(r: Results, path: Path) -> None:
    """Four panels: throughput, overhead, upload answer time, memory."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (throughput, overhead), (answer, memory) = axes
    rates: dict[str, float] = {}
    if r.raw is not None:
        rates["raw model"] = r.raw.best_chunks_per_s
    if r.e2e is not None:
        rates["Sluice"] = r.e2e.chunks_per_s
    if r.inrequest is not None:
        rates["in-request"] = r.inrequest.chunks_per_s
    if r.celery is not None:
        rates["Celery"] = r.celery.chunks_per_s
    target = 0.85 * r.raw.best_chunks_per_s if r.raw is not None else None
    _bars(throughput, "End-to-end throughput", rates, "chunks/s", target)
    if r.overhead is not None:
        o = r.overhead
        msgs = {"Sluice runtime": o.sluice_messages_per_s, "aio-pika": o.plain.messages_per_s}
        _bars(overhead, "Pipeline overhead", msgs, "messages/s", 0.7 * o.plain.messages_per_s)
    if r.saturated is not None:
        s = r.saturated
        times = {"p50": s.answer_ms_p50, "p99": s.answer_ms_p99}
        title = f"Upload answer, {s.clients} clients x 1/{s.interval_s:g} s, embed busy"
        _bars(answer, title, times, "ms", 50.0)
        rss = {name: peak.tree_mb for name, peak in s.rss.items()}
        _bars(memory, f"Peak RSS, {s.burst.uploads + s.uploads} docs queued", rss, "MB", 300.0)
    fig.suptitle(f"Sluice benchmark: {r.documents} documents, {len(r.prepared.texts)} chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
