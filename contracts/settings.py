"""Every setting Sluice reads, from `SLUICE_*` environment variables, in one class."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.messages import StageName


class StageTuning(BaseModel):
    """How much one stage process holds (prefetch) and works on at once (concurrency)."""

    prefetch: int
    concurrency: int


class Settings(BaseSettings):
    """Sluice's configuration; every field maps to `SLUICE_<FIELD>` (e.g. `SLUICE_AMQP_URL`)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_")

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    # Prefix of every exchange and queue name, so several deployments (or test runs) share a broker.
    namespace: str = Field("sluice", pattern=r"^[a-z][a-z0-9_-]{0,30}$")
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 104_857_600
    # `key` (every collection) or `key:coll1|coll2`, comma-separated; unset means no auth.
    api_keys: str | None = None

    # The embedding model: a sentence-transformers directory; empty means the packaged MiniLM.
    model_dir: Path | None = None
    embed_device: str = "auto"
    # `onnx`: ONNX Runtime on CPU (`onnx` extra), model exported once and cached; CPU only.
    embed_backend: Literal["torch", "onnx"] = "torch"
    # Texts per forward pass of the model.
    embed_batch_size: int = Field(16, ge=1)
    # Texts one model call takes from every message in hand, sorted by length and cut into
    # forward passes of `embed_batch_size`: a big call wastes less on padding (bench/README.md).
    embed_call_chunks: int = Field(512, ge=1)
    # How long a lone chunk batch waits for others to share its model call.
    embed_batch_wait_s: float = Field(0.02, ge=0)
    chunk_max_tokens: int = Field(256, ge=16)
    chunk_overlap_tokens: int = Field(32, ge=0)
    chunks_per_message: int = Field(64, ge=1, le=256)

    # Per-stage throttles (`SLUICE_EMBED_PREFETCH`, ...); the README gives the reason for each.
    parse_prefetch: int = Field(2, ge=1)
    parse_concurrency: int = Field(1, ge=1)
    chunk_prefetch: int = Field(4, ge=1)
    chunk_concurrency: int = Field(2, ge=1)
    embed_prefetch: int = Field(32, ge=1)
    embed_concurrency: int = Field(32, ge=1)
    index_prefetch: int = Field(16, ge=1)
    index_concurrency: int = Field(16, ge=1)
    # Stages are batch work: they run this much nicer than the gateway and RabbitMQ, so an
    # upload is answered at once even when a model batch has every core (0: same priority).
    stage_nice: int = Field(10, ge=0, le=19)

    # Delivery safety: how often a message may crash its worker, and when stage queues push back.
    delivery_limit: int = Field(5, ge=1)
    queue_max_length: int = Field(100_000, ge=1)
    retry_delays_s: tuple[int, ...] = (1, 10, 60)
    max_attempts: int = Field(5, ge=1)

    # Hostile input: every limit breached fails the document with its own error code.
    parse_timeout_s: float = Field(120.0, gt=0)
    parse_memory_mb: int = Field(2048, ge=64)
    # A parse worker that still holds more than this after a document is replaced by a fresh one.
    parse_worker_recycle_mb: int = Field(160, ge=64)
    max_pdf_pages: int = Field(2000, ge=1)
    max_docx_uncompressed_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_html_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_text_chars: int = Field(20_000_000, ge=1)

    # An OpenAI-compatible embeddings endpoint instead of the in-process model.
    embed_url: str | None = None
    embed_api_key: str | None = None
    embed_model_name: str = "all-MiniLM-L6-v2"
    embed_timeout_s: float = Field(30.0, gt=0)

    # Short in-process retries for a transient error before the message goes to a retry tier.
    transient_retries: int = Field(2, ge=0)
    # A job with no event for this long is flagged `stalled`.
    stalled_after_s: float = Field(600.0, gt=0)
    # Without API keys the gateway only listens on loopback, unless this says otherwise.
    allow_open: bool = False

    # Observability: where each stage process serves /metrics (the gateway serves its own on
    # its HTTP port; 0 picks a free port, logged at start), and how logs are written.
    parse_metrics_port: int = Field(9101, ge=0, le=65535)
    chunk_metrics_port: int = Field(9102, ge=0, le=65535)
    embed_metrics_port: int = Field(9103, ge=0, le=65535)
    index_metrics_port: int = Field(9104, ge=0, le=65535)
    log_format: Literal["auto", "json", "text"] = "auto"
    # Links the web page offers, when these UIs are reachable for its users.
    jaeger_ui_url: str | None = None
    rabbitmq_ui_url: str | None = None

    def metrics_port(self, stage: StageName) -> int:
        """The port a stage process serves Prometheus metrics on."""
        port: int = getattr(self, f"{stage}_metrics_port")
        return port

    def tuning(self, stage: StageName) -> StageTuning:
        """Prefetch and concurrency for one stage."""
        return StageTuning(
            prefetch=getattr(self, f"{stage}_prefetch"),
            concurrency=getattr(self, f"{stage}_concurrency"),
        )

    @cached_property
    def blob_dir(self) -> Path:
        """Where raw uploads and parsed text live, by sha256."""
        return self.data_dir / "blobs"

    @cached_property
    def index_dir(self) -> Path:
        """The LanceDB directory."""
        return self.data_dir / "index"

    @cached_property
    def job_db_path(self) -> Path:
        """The SQLite job store."""
        return self.data_dir / "jobs.sqlite3"
