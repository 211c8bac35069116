"""The gateway's Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from contracts.pipeline import Pipeline
from gateway.store.base import JobStore

UPLOADS = Counter("sluice_uploads_total", "Upload requests by HTTP status.", ["status"])
UPLOAD_SECONDS = Histogram(
    "sluice_upload_answer_seconds",
    "Time to answer an upload request.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS = Gauge("sluice_jobs", "Jobs in the job store by status.", ["status"])


@contextmanager
def upload_answer() -> Iterator[Callable[[int], None]]:
    """Time an upload and count it by the status it answered (errors count as their status)."""
    started = time.perf_counter()
    status = 500
    # The route reports its status; an ApiError leaving the block carries its own.

    def outcome(code: int) -> None:
        nonlocal status
        status = code

    try:
        yield outcome
    except Exception as exc:
        status = getattr(exc, "status", 500)
        raise
    finally:
        UPLOADS.labels(status=str(status)).inc()
        UPLOAD_SECONDS.observe(time.perf_counter() - started)


def render(store: JobStore, pipeline: Pipeline) -> tuple[bytes, str]:
    """Every metric in the Prometheus text format, job counts read fresh from the store."""
    counts = store.count_by_status()
    for status in pipeline.statuses:
        JOBS.labels(status=status).set(counts.get(status, 0))
    return generate_latest(), CONTENT_TYPE_LATEST
