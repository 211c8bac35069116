"""Every setting Sluice reads, from `SLUICE_*` environment variables, in one class."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from contracts.broker_urls import split_urls
from contracts.errors import SluiceError
from contracts.messages import StageName
from contracts.pipeline import DEFAULT_STAGES, Pipeline

# `SLUICE_<STAGE>_<KEY>`: the settings every stage has, built-in or plugged in.
_STAGE_KEYS = (
    "PREFETCH",
    "CONCURRENCY",
    "METRICS_PORT",
    "RETRY_DELAYS_S",
    "MAX_ATTEMPTS",
    "DELIVERY_LIMIT",
    "TRANSIENT_RETRIES",
)
_STAGE_ENV = re.compile(
    rf"^SLUICE_(?P<stage>[A-Z][A-Z0-9_]*?)_(?P<key>{'|'.join(_STAGE_KEYS)})$", re.IGNORECASE
)
# The model adds [CLS] and [SEP] to every input; chunk sizes count them, the splitter not.
SPECIAL_TOKENS = 2
# Replicas of every queue when SLUICE_AMQP_URL lists a cluster and no group size is set.
CLUSTER_GROUP_SIZE = 3


class StageOverrides(BaseModel):
    """What `SLUICE_<STAGE>_*` variables set for one stage; unset means the stage's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefetch: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    retry_delays_s: tuple[int, ...] | None = None
    max_attempts: int | None = Field(None, ge=1)
    delivery_limit: int | None = Field(None, ge=1)
    transient_retries: int | None = Field(None, ge=0)

    @field_validator("retry_delays_s", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        # Environment values arrive as text: `[1,10,60]` like SLUICE_RETRY_DELAYS_S.
        return json.loads(value) if isinstance(value, str) else value


class StageSettings(BaseModel):
    """One stage's settings, resolved: its overrides, else the stage's or Sluice's defaults."""

    model_config = ConfigDict(frozen=True)

    name: StageName
    # How much one process holds (prefetch) and works on at once (concurrency).
    prefetch: int
    concurrency: int
    metrics_port: int
    retry_delays_s: tuple[int, ...]
    max_attempts: int
    delivery_limit: int
    transient_retries: int

    def retry_delay_s(self, attempt: int) -> int:
        """The retry tier a message that failed its `attempt`-th try waits in."""
        return self.retry_delays_s[min(attempt - 1, len(self.retry_delays_s) - 1)]


class _StageEnvSource(PydanticBaseSettingsSource):
    """Collects `SLUICE_<STAGE>_<KEY>` variables into `stage_overrides`, for any stage name."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Not used: this source fills one field from many variables in `__call__`."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, dict[str, str]] = {}
        for variable, value in os.environ.items():
            if match := _STAGE_ENV.match(variable):
                found.setdefault(match["stage"].lower(), {})[match["key"].lower()] = value
        return {"stage_overrides": found} if found else {}


def _usage(message: str) -> SluiceError:
    return SluiceError(message, code="usage_error")


class Settings(BaseSettings):
    """Sluice's configuration; every field maps to `SLUICE_<FIELD>` (e.g. `SLUICE_AMQP_URL`)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_")

    # The pipeline in order (contracts/pipeline.py); `enrich` is the optional built-in one.
    stages: str = DEFAULT_STAGES
    # `name=package.module,...`: stage modules from outside Sluice, usable in `stages`.
    stage_modules: str = ""
    # Per-stage settings from `SLUICE_<STAGE>_PREFETCH`, `..._CONCURRENCY`, ... (see `stage`).
    stage_overrides: dict[StageName, StageOverrides] = Field(default_factory=dict)

    # One broker, or several nodes of one cluster comma separated (`amqp_urls`): a process
    # connects to the first that answers and, when it loses that node, to the next.
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    # Replicas of every queue Sluice declares (`x-quorum-initial-group-size`), for a cluster.
    # Set, every durable queue is a quorum queue, the retry tiers and dead letters too, so no
    # node holds one alone. Unset: as on one node (RabbitMQ's own group size, classic retry
    # tiers); it is not the default because RabbitMQ refuses to redeclare a queue without it.
    quorum_initial_group_size: int | None = Field(None, ge=1)
    # Prefix of every exchange and queue name, so several deployments (or test runs) share a broker.
    namespace: str = Field("sluice", pattern=r"^[a-z][a-z0-9_-]{0,30}$")
    data_dir: Path = Path("./data")
    # Scale-out backends, chosen by URL (unset: the embedded ones under `data_dir`):
    # `postgresql://...` (any libpq URL) for the job store and the pgvector index,
    # `s3://bucket/prefix` for blobs (endpoint and credentials from the standard AWS_* variables).
    job_store_url: str | None = None
    index_url: str | None = None
    blob_store_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 104_857_600
    # `key` (every collection) or `key:coll1|coll2`, comma-separated; unset means no auth.
    api_keys: str | None = None
    # The HTTP boundary. Host names the gateway answers to, comma-separated (`*`: any); unset
    # means localhost, 127.0.0.1, ::1 and `host` without API keys (a web page cannot reach a
    # loopback gateway by DNS rebinding), any with keys (a page cannot send the key).
    allowed_hosts: str | None = None
    # A request head (line and headers) not complete this long after its first byte, or
    # after the connection opened, closes the connection: slow clients cannot hold sockets.
    header_timeout_s: float = Field(10.0, gt=0)
    # A request body that sends nothing for this long is answered 408 `body_timeout`.
    body_timeout_s: float = Field(30.0, gt=0)
    # Connections held at once; one more closes the one idle longest (or is refused, 503).
    max_connections: int = Field(1000, ge=1)

    # The embedding model: a sentence-transformers directory; empty means the packaged MiniLM.
    model_dir: Path | None = None
    embed_device: str = "auto"
    # How the local model runs. `torch`: sentence-transformers, on `embed_device` (CPU or
    # CUDA). `onnx`: ONNX Runtime on CPU, the model exported once and cached; the same
    # vectors as torch. `onnx-int8`: that export dynamically quantised to INT8 once and cached
    # beside it; CPU only, several times faster than torch, vectors a little off fp32
    # (bench/int8_quality.py). `auto`: torch on CUDA, `onnx-int8` on CPU
    # for the packaged model (stages/backends/factory.py `local_backend`).
    embed_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    # Texts per forward pass of the model on CPU (and per request to an endpoint).
    embed_batch_size: int = Field(16, ge=1)
    # Texts per forward pass when the torch model runs on CUDA: a GPU is kept busy only by
    # hundreds of texts at once (bench/gpu.sh measures 32 to 512).
    embed_cuda_batch_size: int = Field(256, ge=1)
    # Texts one model call takes from every message in hand, sorted by length and cut into
    # forward passes of `embed_batch_size` (`embed_cuda_batch_size` on CUDA): a big call
    # wastes less on padding (bench/README.md).
    embed_call_chunks: int = Field(512, ge=1)
    # With lanes on, a model call runs in slices of this many texts (of similar lengths): an
    # interactive chunk waits for one slice of a bulk call at most, not for the whole call.
    embed_slice_chunks: int = Field(128, ge=1)
    # How long a lone chunk batch waits for others to share its model call.
    embed_batch_wait_s: float = Field(0.02, ge=0)
    chunk_max_tokens: int = Field(256, ge=16)
    chunk_overlap_tokens: int = Field(32, ge=0)
    chunks_per_message: int = Field(64, ge=1, le=256)

    # Stages are batch work: they run this much nicer than the gateway and RabbitMQ, so an
    # upload is answered at once even when a model batch has every core (0: same priority).
    stage_nice: int = Field(10, ge=0, le=19)

    # Delivery safety: how often a message may crash its worker, and when stage queues push back.
    # These are every stage's defaults; `SLUICE_<STAGE>_DELIVERY_LIMIT` (etc.) sets one stage's.
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

    # Scans and images: pages without a text layer are read with OCR (stages/formats/ocr.py);
    # off, image uploads are refused and such pages are left out.
    ocr: bool = True
    ocr_engine: Literal["tesseract", "rapidocr"] = "tesseract"
    # A scan's pages are read in ranges of this many, each by whichever parse worker is free.
    ocr_pages_per_range: int = Field(8, ge=1, le=1000)
    # Limits on reading one page (each page is rendered, read and released on its own).
    ocr_page_timeout_s: float = Field(60.0, gt=0)
    ocr_page_memory_mb: int = Field(1024, ge=128)
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
    # A job recorded but not confirmed by the broker for this long (its gateway died between
    # the two) is published again by whichever gateway claims it first.
    republish_after_s: float = Field(30.0, gt=0)
    # Lanes (README "Lanes and fair share"): off sends all work through one FIFO queue per
    # stage, as before lanes (for comparison; the job still records its priority).
    lanes: bool = True
    # The share of a busy worker's slots bulk work is guaranteed while interactive work waits.
    bulk_share: float = Field(0.2, gt=0, le=1)
    # Bulk documents admitted into the pipeline at once (all collections together); the rest
    # wait in the job store and are admitted fairly, the collection with fewest in flight first.
    bulk_in_flight: int = Field(32, ge=1)
    # Interactive documents one collection may have in the pipeline before its further ones
    # wait their turn like bulk work (so one tenant's flood cannot hold the others).
    interactive_in_flight_per_collection: int = Field(32, ge=1)
    # How often each stage process sends its heartbeat; a gateway calls a worker unhealthy
    # after three missed.
    heartbeat_every_s: float = Field(5.0, gt=0)

    # Messages between Sluice processes: the HMAC-SHA256 key each one is signed with and every
    # consumer checks (contracts/message_signature.py). Unset: a random one is made once and
    # kept in the data dir; set the same value everywhere when processes share no disk.
    message_secret: str | None = None

    # Webhooks: the HMAC-SHA256 key `X-Sluice-Signature` is made with (unset: a random one is
    # made once and kept in the data dir; set it when several machines send webhooks).
    webhook_secret: str | None = None
    # Callback targets on loopback or private networks are refused unless this is set.
    webhook_allow_private: bool = False
    # Per API key, the `callback_url` its uploads get when they name none: JSON
    # `{"key": "https://..."}`.
    key_callback_urls: dict[str, str] = Field(default_factory=dict)
    webhook_timeout_s: float = Field(10.0, gt=0)

    # Without API keys the gateway only listens on loopback, unless this says otherwise.
    allow_open: bool = False

    # Observability: how logs are written (each stage's /metrics port is a stage setting,
    # `SLUICE_<STAGE>_METRICS_PORT`; the gateway serves its own on its HTTP port).
    log_format: Literal["auto", "json", "text"] = "auto"
    # INFO: a stage logs what goes wrong and a summary per heartbeat; DEBUG adds a line for
    # every message it finishes.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Links the web page offers, when these UIs are reachable for its users.
    jaeger_ui_url: str | None = None
    rabbitmq_ui_url: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, plus the per-stage variables of any stage name."""
        return (
            init_settings,
            env_settings,
            _StageEnvSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        # `debug` means what `DEBUG` does, as it does for Python's logging.
        return value.upper() if isinstance(value, str) else value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str | None) -> str | None:
        # A URL where a name belongs would match no Host header, and lock everyone out.
        for entry in (value or "").split(","):
            if "/" in entry or "@" in entry or any(c.isspace() for c in entry.strip()):
                raise ValueError(
                    f"SLUICE_ALLOWED_HOSTS entry {entry.strip()!r} is not a host name: list "
                    "names as clients write them in URLs, e.g. sluice.example.com,localhost"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Cross-field checks, each naming the variable to change."""
        if not self.retry_delays_s or min(self.retry_delays_s) < 1:
            raise ValueError(
                f"SLUICE_RETRY_DELAYS_S={list(self.retry_delays_s)} must list at least one "
                "delay of 1 second or more, e.g. [1,10,60]"
            )
        capacity = self.chunk_max_tokens - SPECIAL_TOKENS
        if self.chunk_overlap_tokens > capacity // 2:
            raise ValueError(
                f"SLUICE_CHUNK_OVERLAP_TOKENS={self.chunk_overlap_tokens} is too large for "
                f"SLUICE_CHUNK_MAX_TOKENS={self.chunk_max_tokens}: at most {capacity // 2} "
                "(half a chunk, less the model's 2 special tokens)"
            )
        for name, overrides in self.stage_overrides.items():
            if overrides.retry_delays_s is not None and (
                not overrides.retry_delays_s or min(overrides.retry_delays_s) < 1
            ):
                raise ValueError(
                    f"SLUICE_{name.upper()}_RETRY_DELAYS_S must list at least one delay of "
                    "1 second or more"
                )
        return self

    @cached_property
    def pipeline(self) -> Pipeline:
        """The stages `stages` and `stage_modules` describe (raises a usage error if wrong)."""
        from contracts.pipeline import resolve

        return resolve(self)

    @cached_property
    def amqp_urls(self) -> tuple[str, ...]:
        """The brokers `amqp_url` lists, in the order a process tries them."""
        return split_urls(self.amqp_url)

    @model_validator(mode="after")
    def _cluster_consistent(self) -> Self:
        """Several brokers are a cluster: unless told otherwise, every queue is replicated on
        three of its nodes (RabbitMQ caps it at the cluster's size), so a retry tier or the
        dead-letter queue is never lost with one node."""
        if len(split_urls(self.amqp_url)) > 1 and self.quorum_initial_group_size is None:
            self.quorum_initial_group_size = CLUSTER_GROUP_SIZE
        return self

    def stage(self, name: StageName) -> StageSettings:
        """One stage's settings: `SLUICE_<STAGE>_*`, else the stage's, else Sluice's defaults."""
        spec = self.pipeline.spec(name)
        given = self.stage_overrides.get(name, StageOverrides())
        explicit = self.model_fields_set

        def policy(field: str, declared: Any) -> Any:
            # An operator's deployment-wide value beats a stage's own default.
            value = getattr(given, field)
            if value is not None:
                return value
            if declared is not None and field not in explicit:
                return declared
            return getattr(self, field)

        # One of the pair set alone moves the other's default with it; both set must agree.
        least = self._gpu_feed(name)
        prefetch = given.prefetch or max(spec.prefetch, least, given.concurrency or 0)
        concurrency = given.concurrency or min(max(spec.concurrency, least), prefetch)
        return StageSettings(
            name=name,
            prefetch=prefetch,
            concurrency=concurrency,
            metrics_port=spec.metrics_port if given.metrics_port is None else given.metrics_port,
            retry_delays_s=policy("retry_delays_s", spec.retry_delays_s),
            max_attempts=policy("max_attempts", spec.max_attempts),
            delivery_limit=policy("delivery_limit", None),
            transient_retries=policy("transient_retries", spec.transient_retries),
        )

    def _gpu_feed(self, name: StageName) -> int:
        """The messages an embed stage on CUDA holds and works on at least (0: no such rule).

        Two full model calls' worth: one call on the GPU while the next one's messages are
        already in hand, so the GPU never waits for the broker. A stage's own prefetch may
        hold more (the embed stage's 32 messages are four calls at the defaults); the rule
        matters when a call takes more chunks or a message fewer.
        """
        if name != "embed" or not self.embeds_on_cuda():
            return 0
        return 2 * math.ceil(self.embed_call_chunks / self.chunks_per_message)

    def embeds_on_cuda(self) -> bool:
        """Whether this process's local torch model runs on CUDA: `SLUICE_EMBED_DEVICE=cuda`
        (or `cuda:N`), or `auto` where torch sees a GPU.

        `auto` is only asked of a torch already imported, never by importing it: the embed
        stage loads its model (and torch) before its runner reads its tuning, and a process
        without the model (the gateway declaring queues) has no GPU to keep busy.
        """
        if self.embed_url or self.embed_backend not in ("auto", "torch"):
            return False
        if self.embed_device.split(":", 1)[0] == "cuda":
            return True
        torch = sys.modules.get("torch")
        return self.embed_device == "auto" and torch is not None and bool(torch.cuda.is_available())

    def check(self) -> Pipeline:
        """Everything that can be wrong before a process starts, raised as one usage error."""
        pipeline = self.pipeline
        for name in (s.name for s in pipeline.processes):
            tuned = self.stage(name)
            if tuned.prefetch < tuned.concurrency:
                raise _usage(
                    f"SLUICE_{name.upper()}_PREFETCH={tuned.prefetch} is below "
                    f"SLUICE_{name.upper()}_CONCURRENCY={tuned.concurrency}: the stage would "
                    "hold fewer messages than it has workers for, and the rest would starve; "
                    "raise the prefetch or lower the concurrency"
                )
        return pipeline

    @cached_property
    def blob_dir(self) -> Path:
        """Where raw uploads and parsed text live, by sha256."""
        return self.data_dir / "blobs"

    @cached_property
    def upload_staging_dir(self) -> Path:
        """Where the gateway spools uploads while it hashes and checks them (a local cache)."""
        path = self.data_dir / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def index_dir(self) -> Path:
        """The LanceDB directory."""
        return self.data_dir / "index"

    @cached_property
    def job_db_path(self) -> Path:
        """The SQLite job store."""
        return self.data_dir / "jobs.sqlite3"
