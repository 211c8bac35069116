"""Sluice side by side with what users run today, on one generated corpus and a private RabbitMQ.

`python -m bench.run [--scale S]` (or `bash scripts/bench.sh`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from broker import PrivateBroker

from bench.baseline import BASELINE_REV, baseline
from bench.celery_run import celery_chain
from bench.corpus import corpus, small_documents
from bench.cpu import PhaseMeter
from bench.inproc import chunk_rates
from bench.inrequest import in_request
from bench.lanes import lanes
from bench.ocr_compare import compare as ocr_compare
from bench.overhead import overhead
from bench.prepare import prepare
from bench.raw_model import measure
from bench.reindex_bench import reindex_under_search
from bench.report import FP32_BACKEND, INT8_BACKEND, Results, markdown, write
from bench.search_latency import search_latency
from bench.sluice_run import EndToEnd, end_to_end, saturated, scale_out_end_to_end
from bench.zerocost import zerocost
from contracts.settings import Settings
from stages.backends.factory import local_backend

if TYPE_CHECKING:
    from bench.int8_quality import Int8Quality
    from bench.vector_codec import VectorCodec

PHASES = (
    "raw",
    "vectors",
    "int8",
    "enrich",
    "sluice",
    "sluice-fp32",
    "sluice-int8",
    "scaleout",
    "inrequest",
    "celery",
    "overhead",
    "zerocost",
    "baseline",
    "saturated",
    "lanes",
    "search",
    "ocr",
    "reindex",
)
# `--phases fast2`: the figures of the issue "Fast round 2" (bench/README.md).
PRESETS = {
    "fast2": "raw,vectors,int8,sluice,sluice-fp32,sluice-int8,celery,overhead,zerocost,baseline"
}
# The end-to-end variants by embed backend: phase name, `SLUICE_EMBED_BACKEND`.
BACKEND_PHASES = (("sluice-fp32", FP32_BACKEND), ("sluice-int8", INT8_BACKEND))
OUT = Path(__file__).resolve().parent / "out"
T = TypeVar("T")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(results: Results, phase: str, work: Callable[[], T]) -> T | None:
    """Run one phase, recording its wall and CPU time; a failure is reported, not fatal."""
    print(f"== {phase}", flush=True)
    started = time.monotonic()
    meter = PhaseMeter().start()
    try:
        value: T | None = work()
    except Exception as exc:
        # One broken phase must not throw away the figures of the others.
        traceback.print_exc()
        results.errors[phase] = f"{type(exc).__name__}: {exc}"[:500]
        value = None
    results.phase_cpu_s[phase] = meter.stop()
    results.phase_s[phase] = time.monotonic() - started
    print(f"== {phase} done in {results.phase_s[phase]:.0f} s", flush=True)
    return value


def vector_codec() -> VectorCodec:
    """One 64-chunk batch's vectors as JSON lists and packed (bench/vector_codec.py)."""
    from bench.vector_codec import measure as measure_codec

    return measure_codec()


def int8_quality(texts: list[str]) -> Int8Quality:
    """INT8 against fp32 in process over `texts` (bench/int8_quality.py), a query made from
    every chunk: with 200, a recall@3 difference of a point was four queries either way."""
    from bench.int8_quality import measure as measure_int8

    return measure_int8(texts, queries=len(texts))


def main() -> None:
    """Parse arguments, run the chosen phases, print and write the report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0, help="corpus and backlog size factor")
    ap.add_argument("--clients", type=int, default=4, help="concurrent uploaders for throughput")
    ap.add_argument("--overhead-repeat", type=int, default=10, help="corpus copies through phase 5")
    ap.add_argument("--load-clients", type=int, default=50, help="concurrent uploaders, phase 6")
    ap.add_argument(
        "--load-interval-s", type=float, default=1.0, help="phase 6: each client's upload interval"
    )
    ap.add_argument(
        "--burst", type=int, default=500, help="phase 6: closed-loop uploads first (capacity)"
    )
    ap.add_argument("--backlog", type=int, default=5000, help="documents queued in phase 7")
    ap.add_argument(
        "--lanes-bulk", type=int, default=2000, help="bulk documents ahead of interactive ones"
    )
    ap.add_argument(
        "--lanes-fair-backlog", type=int, default=1000, help="one collection's backlog, fairness"
    )
    ap.add_argument("--window-s", type=float, default=60.0, help="memory window after uploads")
    ap.add_argument(
        "--search-chunks", type=int, default=100_000, help="vectors in each index, search phase"
    )
    ap.add_argument(
        "--zerocost-repeat", type=int, default=3, help="corpus copies through the zerocost phase"
    )
    ap.add_argument(
        "--baseline-rev", default=BASELINE_REV, help="the commit the baseline phase runs"
    )
    ap.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"subset of {','.join(PHASES)}, or a preset: {', '.join(PRESETS)}",
    )
    ap.add_argument("--deadline-s", type=float, default=1200.0, help="give up on a phase after")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    phases = set(PRESETS.get(args.phases, args.phases).split(","))
    if unknown := phases - set(PHASES):
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    # Measure Sluice's defaults with tracing off, not whatever this shell has exported.
    for name in [n for n in os.environ if n.startswith(("SLUICE_", "OTEL_"))]:
        del os.environ[name]

    started = time.monotonic()
    load_before = load_average()
    docs = corpus(args.scale)
    backlog_count = max(100, round(args.backlog * args.scale))
    print(f"corpus: {len(docs)} documents, {sum(len(d.data) for d in docs) / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, PrivateBroker() as broker:
        root = Path(tmp)
        print(f"private RabbitMQ at {broker.amqp_url} (data under {root})", flush=True)
        prepared = asyncio.run(prepare(docs, root / "prepare"))
        print(f"chunks: {len(prepared.texts)}", flush=True)
        r = Results(
            scale=args.scale,
            documents=len(docs),
            prepared=prepared,
            load_before=load_before,
            # The SLUICE_ variables are cleared above: this is Sluice's own default.
            default_backend=local_backend(Settings()),
        )
        deadline = args.deadline_s
        if "raw" in phases:
            r.raw = timed(r, "raw", lambda: measure(prepared.texts))
        if "vectors" in phases:
            r.vectors = timed(r, "vectors", vector_codec)
        if "int8" in phases:
            r.int8 = timed(r, "int8", lambda: int8_quality(prepared.texts))
        if "enrich" in phases:
            batches = [b for found in prepared.recording.chunked.values() for b in found]
            r.chunk_rates = timed(
                r, "enrich", lambda: asyncio.run(chunk_rates(root / "enrich", batches))
            )
        if "sluice" in phases:
            r.e2e = timed(
                r,
                "sluice",
                lambda: end_to_end(
                    broker, root / "sluice", docs, clients=args.clients, deadline_s=deadline
                ),
            )
        for phase, backend in BACKEND_PHASES:
            if phase not in phases:
                continue
            run: EndToEnd | None
            if backend == r.default_backend and r.e2e is not None:
                # The `sluice` phase already ran this backend: the same figure, not a second run.
                run = r.e2e
                r.reused.append(phase)
            else:
                run = timed(
                    r,
                    phase,
                    functools.partial(
                        end_to_end,
                        broker,
                        root / phase,
                        docs,
                        clients=args.clients,
                        deadline_s=deadline,
                        SLUICE_EMBED_BACKEND=backend,
                    ),
                )
            if backend == FP32_BACKEND:
                r.e2e_fp32 = run
            else:
                r.e2e_int8 = run
        if "scaleout" in phases:
            r.scale_out = timed(
                r,
                "scaleout",
                lambda: scale_out_end_to_end(
                    broker, root / "scaleout", docs, clients=args.clients, deadline_s=deadline
                ),
            )
        if "inrequest" in phases:
            r.inrequest = timed(
                r,
                "inrequest",
                lambda: in_request(
                    root / "inrequest", docs, clients=args.clients, deadline_s=deadline
                ),
            )
        if "celery" in phases:
            r.celery = timed(
                r,
                "celery",
                lambda: celery_chain(
                    broker,
                    root / "celery",
                    docs,
                    expected_chunks=len(prepared.texts),
                    deadline_s=deadline,
                    embed_backend=r.default_backend,
                ),
            )
        if "overhead" in phases:
            r.overhead = timed(
                r,
                "overhead",
                lambda: overhead(
                    broker,
                    root / "overhead",
                    prepared,
                    repeat=args.overhead_repeat,
                    deadline_s=deadline,
                ),
            )
        if "zerocost" in phases:
            r.zerocost = timed(
                r,
                "zerocost",
                lambda: zerocost(
                    broker,
                    root / "zerocost",
                    docs,
                    repeat=args.zerocost_repeat,
                    clients=args.clients,
                    deadline_s=deadline,
                ),
            )
        if "baseline" in phases:
            r.baseline = timed(
                r,
                "baseline",
                lambda: baseline(
                    root / "baseline",
                    rev=args.baseline_rev,
                    scale=args.scale,
                    overhead_repeat=args.overhead_repeat,
                    deadline_s=deadline,
                ),
            )
        if "saturated" in phases:
            backlog = small_documents(backlog_count)
            r.saturated = timed(
                r,
                "saturated",
                lambda: saturated(
                    broker,
                    root / "saturated",
                    docs,
                    backlog,
                    clients=args.load_clients,
                    interval_s=args.load_interval_s,
                    # Half the backlog at most: the paced uploads are the timed ones.
                    burst=min(args.burst, len(backlog) // 2),
                    window_s=args.window_s,
                ),
            )
        if "lanes" in phases:
            bulk = small_documents(max(100, round(args.lanes_bulk * args.scale)))
            interactive = small_documents(20, first=1_000_000)
            fair_backlog = min(len(bulk), max(50, round(args.lanes_fair_backlog * args.scale)))
            r.lanes = timed(
                r,
                "lanes",
                lambda: lanes(
                    broker,
                    root / "lanes",
                    docs,
                    bulk,
                    interactive,
                    fairness_backlog=fair_backlog,
                    clients=args.clients,
                    deadline_s=deadline,
                ),
            )
        if "search" in phases:
            r.search = timed(r, "search", lambda: search_latency(args.search_chunks))
        if "ocr" in phases:
            # Scanned pages: each OCR engine at each DPI, one core (bench/ocr_compare.py).
            r.ocr = timed(r, "ocr", lambda: ocr_compare(max(2, round(6 * args.scale))))
        if "reindex" in phases:
            # The corpus re-indexed with other chunk sizes under search (bench/reindex_bench.py).
            r.reindex = timed(
                r,
                "reindex",
                lambda: reindex_under_search(
                    broker, root / "reindex", docs, clients=args.clients, deadline_s=deadline
                ),
            )
            if r.reindex is not None and r.reindex.state != "done":
                # Its figures stay in the table; the run says it did not finish.
                r.errors["reindex"] = f"the reindex ended {r.reindex.state}, not done"
    r.load_after = load_average()
    r.total_s = time.monotonic() - started
    write(r, args.out)
    print()
    print(markdown(r))
    print(f"written to {args.out}/results.md, results.json, results.png")


if __name__ == "__main__":
    main()
