"""Sluice side by side with what users run today, on one generated corpus and a private RabbitMQ.

`python -m bench.run [--scale S]` (or `bash scripts/bench.sh`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from broker import PrivateBroker

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
from bench.report import Results, markdown, write
from bench.search_latency import search_latency
from bench.sluice_run import end_to_end, saturated, scale_out_end_to_end

PHASES = (
    "raw",
    "enrich",
    "sluice",
    "scaleout",
    "inrequest",
    "celery",
    "overhead",
    "saturated",
    "lanes",
    "search",
    "ocr",
    "reindex",
)
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
    ap.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    ap.add_argument("--deadline-s", type=float, default=1200.0, help="give up on a phase after")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    phases = set(args.phases.split(","))
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
            scale=args.scale, documents=len(docs), prepared=prepared, load_before=load_before
        )
        deadline = args.deadline_s
        if "raw" in phases:
            r.raw = timed(r, "raw", lambda: measure(prepared.texts))
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
