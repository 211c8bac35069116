"""Prometheus metrics of a stage process, served on its own port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

CONSUMED = Counter("sluice_messages_consumed", "Messages a stage took from its queue.", ["stage"])
SUCCEEDED = Counter(
    "sluice_messages_succeeded", "Messages handled and acked after their outputs.", ["stage"]
)
RETRIED = Counter(
    "sluice_messages_retried", "Messages parked in a retry tier, by error code.", ["stage", "code"]
)
DEAD_LETTERED = Counter(
    "sluice_messages_dead_lettered", "Messages sent to the dead-letter queue.", ["stage", "code"]
)
HANDLER_SECONDS = Histogram(
    "sluice_handler_duration_seconds",
    "Time a stage's handler took per message.",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CHUNKS = Counter("sluice_chunks_processed", "Chunks in the messages a stage handled.", ["stage"])
OCR_PAGES = Counter(
    "sluice_ocr_pages", "Pages a parse process read with OCR (scans and images).", ["engine"]
)
EMBED_BATCH_SIZE = Histogram(
    "sluice_embed_batch_size",
    "Texts per embedding model call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics on `port` (a busy port falls back to a free one); returns the port."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        # A second process of the same stage on one machine: still observable, on another port.
        log.warning("metrics port %d is taken (%s); using a free port", port, exc)
        server, _ = start_http_server(0, addr=host)
    bound: int = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
