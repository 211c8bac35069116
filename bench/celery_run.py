"""Drive the Celery baseline: one worker per stage queue on the private broker, the corpus
submitted as one chain per document, timed until the index holds every chunk."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from broker import BrokerHandle
from pipeline import queue_consumers

from bench.corpus import Document
from bench.cpu import CpuMeter
from bench.procs import child_env, spawn, stop, wait_for
from bench.throughput import Throughput
from contracts.messages import DocumentUploaded, StageName
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from stages.backends.blobs import LocalBlobStore
from stages.formats import sniff

# Sluice's per-stage concurrency: parse 1, chunk 2, index 2. Sluice's embed takes many messages
# at once only to merge them into one model call; a Celery embed task already holds a whole
# document, and two model calls at once would just split the same cores, so embed runs one.
# solo runs tasks in the worker's main thread; threads is Celery's pool for 2 at a time.
POOLS: dict[StageName, tuple[str, int]] = {
    "parse": ("solo", 1),
    "chunk": ("threads", 2),
    "embed": ("solo", 1),
    "index": ("threads", 2),
}


@dataclass(frozen=True)
class CeleryRun(Throughput):
    """Throughput of the corpus through the Celery chain, first submission to last chunk
    indexed."""

    cpu_s: dict[str, float]


def worker_command(stage: StageName) -> list[str]:
    """The `celery worker` command line for one stage's queue."""
    from bench.celery_app import queue_of

    pool, concurrency = POOLS[stage]
    return [
        *(sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker"),
        *("-Q", queue_of(stage), "-n", f"{stage}@bench", "--loglevel", "WARNING"),
        *("--pool", pool, "--concurrency", str(concurrency)),
        # Gossip, mingle and heartbeats only matter to a cluster of workers watching each other.
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
    ]


# The table the index stage writes the corpus collection to.
TABLE = "chunks_corpus"


def celery_chain(
    broker: BrokerHandle,
    root: Path,
    docs: list[Document],
    *,
    expected_chunks: int,
    deadline_s: float,
    embed_backend: str,
) -> CeleryRun:
    """Start the four workers, run every document's chain, stop the workers. The embed
    worker uses `embed_backend`: the one Sluice is measured with, so only the plumbing differs."""
    data_dir = root / "data"
    env = child_env(
        SLUICE_BENCH_AMQP_URL=broker.amqp_url,
        SLUICE_DATA_DIR=str(data_dir),
        SLUICE_EMBED_BACKEND=embed_backend,
    )
    workers = [spawn(worker_command(s), root / f"celery-{s}.log", env) for s in STAGES]
    try:
        from bench.celery_app import app, queue_of

        wait_for(
            lambda: all(queue_consumers(broker, queue_of(s)) >= 1 for s in STAGES),
            180,
            "the Celery workers",
            root / "celery-parse.log",
        )
        app.conf.broker_url = broker.amqp_url
        meter = CpuMeter({s: w.pid for s, w in zip(STAGES, workers, strict=True)}).start()
        documents, chunks, wall_s = _submit(data_dir, docs, expected_chunks, deadline_s)
        return CeleryRun(documents, chunks, wall_s, meter.stop())
    finally:
        stop(workers)


def _submit(
    data_dir: Path, docs: list[Document], expected_chunks: int, deadline_s: float
) -> tuple[int, int, float]:
    from celery import chain  # type: ignore[import-untyped, import-not-found, unused-ignore]

    from bench.celery_app import chunk_task, embed_task, index_task, parse_task

    blobs = LocalBlobStore(data_dir / "blobs")
    started = time.perf_counter()
    results = []
    for doc in docs:
        # What a Celery upload route does: keep the bytes, then enqueue the document's chain.
        sha256 = blobs.put_bytes(doc.data)
        with blobs.as_file(sha256) as path:
            content_type = sniff(path)
        uploaded = DocumentUploaded(
            job_id=uuid.uuid4().hex,
            document_id=uuid.uuid4().hex,
            collection="corpus",
            filename=doc.name,
            blob_sha256=sha256,
            content_type=content_type,
            size_bytes=len(doc.data),
        )
        flow = chain(
            parse_task.s(uploaded.model_dump_json()), chunk_task.s(), embed_task.s(), index_task.s()
        )
        results.append(flow.apply_async())
    chunks = _wait_until_indexed(data_dir / "index", expected_chunks, results, deadline_s)
    return len(docs), chunks, time.perf_counter() - started


def _wait_until_indexed(
    index_dir: Path, expected_chunks: int, results: list[Any], deadline_s: float
) -> int:
    """Poll the index until it holds every chunk: the chains' own results travel over the rpc
    backend, which lost one now and then (a fresh-clone run waited on a chain whose tasks had
    all run), so the index the last task writes is the measure."""
    import lancedb

    db = lancedb.connect(index_dir, read_consistency_interval=timedelta(0))
    end = time.monotonic() + deadline_s
    checked = 0.0
    while True:
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            if failed := [r for r in results if r.ready() and r.failed()]:
                raise RuntimeError(f"{len(failed)} Celery chains failed: {failed[0].result!r}")
        tables = db.list_tables().tables
        indexed = db.open_table(TABLE).count_rows() if TABLE in tables else 0
        if indexed >= expected_chunks:
            return int(indexed)
        if time.monotonic() > end:
            raise TimeoutError(f"{indexed} of {expected_chunks} chunks indexed by the deadline")
        # Often enough for a figure over tens of seconds, rarely enough to cost the workers
        # no CPU to speak of.
        time.sleep(0.25)
