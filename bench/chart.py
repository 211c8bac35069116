"""The benchmark's bar chart (matplotlib, Agg: no display needed): one panel per group of
figures that was measured, each with its unit and, where the figure has one, its target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib  # type: ignore[import-not-found, unused-ignore]

# Agg before pyplot is imported: the benchmark runs headless.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
from matplotlib.axes import Axes  # type: ignore[import-not-found, unused-ignore]
from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]

from bench.report import (
    E2E_OVER_RAW,
    INT8_OVER_RAW,
    NON_EMBED_RSS_MB,
    OVERHEAD_RATIO,
    UPLOAD_P99_MS,
)

if TYPE_CHECKING:
    from bench.report import Results

COLUMNS = 2
# Bars further apart than this ratio are drawn on a log axis, so the small ones stay readable.
LOG_SPREAD = 20.0
# One line style per target of a panel (a panel has two at most).
LINE_STYLES = ("--", ":", "-.")


@dataclass(frozen=True)
class Panel:
    """One panel's bars: what they are, in which unit, and a line per target (label → value)."""

    title: str
    unit: str
    values: dict[str, float]
    targets: dict[str, float] = field(default_factory=dict)


def panels(r: Results) -> list[Panel]:
    """A panel for each group of figures the run measured, none for what it did not."""
    out: list[Panel] = []
    rates: dict[str, float] = {}
    if r.raw is not None:
        rates["raw fp32 model"] = r.raw.best_chunks_per_s
    if r.e2e is not None:
        rates[f"Sluice ({r.default_backend})"] = r.e2e.chunks_per_s
    if r.e2e_fp32 is not None and "sluice-fp32" not in r.reused:
        rates["Sluice fp32"] = r.e2e_fp32.chunks_per_s
    if r.e2e_int8 is not None and "sluice-int8" not in r.reused:
        rates["Sluice INT8"] = r.e2e_int8.chunks_per_s
    if r.inrequest is not None:
        rates["in-request"] = r.inrequest.chunks_per_s
    if r.celery is not None:
        rates["Celery"] = r.celery.chunks_per_s
    if r.baseline is not None and r.baseline.sluice_chunks_per_s is not None:
        rates[f"Sluice at {r.baseline.rev}"] = r.baseline.sluice_chunks_per_s
    if r.zerocost is not None:
        rates["zero-cost embedder (ceiling)"] = r.zerocost.chunks_per_s
    if rates:
        targets: dict[str, float] = {}
        if r.raw is not None:
            targets[f"{E2E_OVER_RAW}x raw fp32"] = E2E_OVER_RAW * r.raw.best_chunks_per_s
            if r.e2e_int8 is not None:
                targets[f"{INT8_OVER_RAW}x raw fp32 (INT8)"] = (
                    INT8_OVER_RAW * r.raw.best_chunks_per_s
                )
        out.append(Panel("End-to-end throughput", "chunks/s", rates, targets))
    if r.zerocost is not None:
        out.append(
            Panel(
                "Zero-cost embedder run: cost of each process",
                "chunks per CPU-second",
                r.zerocost.chunks_per_cpu_s,
            )
        )
    msgs: dict[str, float] = {}
    plain: float | None = None
    if r.overhead is not None:
        o = r.overhead
        plain = o.plain.messages_per_s
        msgs = {"Sluice runtime": o.sluice_messages_per_s, "aio-pika": plain}
    if r.baseline is not None and r.baseline.sluice_messages_per_s is not None:
        msgs[f"Sluice at {r.baseline.rev}"] = r.baseline.sluice_messages_per_s
        if plain is None:
            plain = r.baseline.plain_messages_per_s
    if msgs:
        line = {f"{OVERHEAD_RATIO}x aio-pika": OVERHEAD_RATIO * plain} if plain else {}
        out.append(Panel("Pipeline overhead", "messages/s", msgs, line))
    if r.vectors is not None:
        v = r.vectors
        out.append(
            Panel(
                f"Body of one {v.chunks}-chunk embedded batch",
                "KB per batch",
                {"JSON lists (v1)": v.json_bytes / 1024, "packed (v2)": v.packed_bytes / 1024},
            )
        )
    if r.saturated is not None:
        s = r.saturated
        out.append(
            Panel(
                f"Upload answer, {s.clients} clients x 1/{s.interval_s:g} s, embed busy",
                "ms",
                {"p50": s.answer_ms_p50, "p99": s.answer_ms_p99},
                {"p99 target": UPLOAD_P99_MS},
            )
        )
        out.append(
            Panel(
                f"Peak RSS, {s.burst.uploads + s.uploads} docs queued",
                "MB",
                {name: peak.tree_mb for name, peak in s.rss.items()},
                {"non-embed target": NON_EMBED_RSS_MB},
            )
        )
    return out


def _bars(ax: Axes, panel: Panel) -> None:
    """One panel: labelled bars, its target line."""
    names = list(panel.values)
    bars = ax.bar(names, [panel.values[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for (label, value), style in zip(panel.targets.items(), LINE_STYLES, strict=False):
        ax.axhline(value, color="#c44e52", linestyle=style, linewidth=1, label=label)
    if panel.targets:
        ax.legend(fontsize=8)
    ax.set_title(panel.title, fontsize=10)
    heights = [v for v in panel.values.values() if v > 0]
    if heights and max(heights) > LOG_SPREAD * min(heights):
        ax.set_yscale("log")
        ax.set_ylabel(f"{panel.unit} (log scale)", fontsize=9)
    else:
        ax.set_ylabel(panel.unit, fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=15)


def figure(r: Results) -> Figure:
    """The chart: its panels in a grid just large enough for them."""
    drawn = panels(r)
    columns = min(COLUMNS, max(1, len(drawn)))
    rows = max(1, math.ceil(len(drawn) / columns))
    fig = plt.figure(figsize=(6 * columns, 4 * rows))
    for n, panel in enumerate(drawn, start=1):
        _bars(fig.add_subplot(rows, columns, n), panel)
    if not drawn:
        fig.text(0.5, 0.5, "no charted phase ran", ha="center", va="center")
    fig.suptitle(f"Sluice benchmark: {r.documents} documents, {len(r.prepared.texts)} chunks")
    fig.tight_layout()
    return fig


def chart(r: Results, path: Path) -> None:
    """Write the chart to `path`."""
    fig = figure(r)
    fig.savefig(path, dpi=110)
    plt.close(fig)
