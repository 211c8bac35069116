"""Job events: the control plane. Stages publish them; only the gateway's tracker reads them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from contracts import routing
from contracts.messages import (
    MAX_COUNT,
    SCHEMA_VERSION,
    ChunkBatch,
    DocumentParsed,
    DocumentUploaded,
    Id,
    Message,
    Sha256,
    StageName,
)

# A stage name as events carry it (any stage of the pipeline, built-in or plugged in).
StageField = Annotated[StageName, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,30}$")]

# `retrying`: an attempt failed and the message waits in a retry tier (the job shows the error).
EventKind = Literal["started", "progress", "retrying", "failed"]


class JobError(BaseModel):
    """Why a job failed: the stage, a stable code, a sentence, and whether a retry may help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: StageField
    code: str
    message: str
    retryable: bool


class JobEvent(BaseModel):
    """One step of one job in one stage.

    `progress` is published once per message a stage finished, naming its unit of work
    (batch index and count), so the tracker counts each unit once however often it is redelivered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    job_id: Id
    document_id: Id
    stage: StageField
    kind: EventKind
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    attempt: int = Field(1, ge=1)
    batch_index: int = Field(0, ge=0, lt=MAX_COUNT)
    batch_count: int = Field(1, ge=1, le=MAX_COUNT)
    chunks: int = Field(0, ge=0, le=MAX_COUNT)
    pages: int | None = Field(None, ge=0, le=MAX_COUNT)
    chunks_total: int | None = Field(None, ge=0, le=MAX_COUNT)
    # The parsed text's blob: the gateway deletes it with the document, so never a path.
    parsed_sha256: Sha256 | None = None
    language: str | None = Field(None, pattern=r"^[a-z]{2,3}$")
    error: JobError | None = None

    @model_validator(mode="after")
    def _within_its_batches(self) -> Self:
        if self.batch_index >= self.batch_count:
            raise ValueError(
                f"batch_index {self.batch_index} is not below batch_count {self.batch_count}"
            )
        return self

    @property
    def routing_key(self) -> str:
        """`job.<stage>.<kind>`."""
        return routing.job_event_key(self.stage, self.kind)


# The most events one `JobEvents` message carries: a busy stage's events of a few milliseconds.
MAX_EVENTS_PER_MESSAGE = 256


class JobEvents(BaseModel):
    """Several progress events of one stage, published as one message.

    A busy stage process finishes many messages at once; their events go out together
    (stages/runtime/event_batcher.py), so the broker carries one event message per many
    data messages. Published to the same key as one of them (`job.<stage>.progress`); a lone
    event goes out as a plain `JobEvent`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    stage: StageField
    events: list[JobEvent] = Field(min_length=1, max_length=MAX_EVENTS_PER_MESSAGE)

    @model_validator(mode="after")
    def _one_stage_progress(self) -> Self:
        # Signed for `job.<stage>.progress`: it may speak only of that stage's progress.
        if any(e.stage != self.stage or e.kind != "progress" for e in self.events):
            raise ValueError(f"a JobEvents message holds only {self.stage}'s progress events")
        return self

    @property
    def routing_key(self) -> str:
        """`job.<stage>.progress`."""
        return routing.job_event_key(self.stage, "progress")


_EVENT_BODY: TypeAdapter[JobEvents | JobEvent] = TypeAdapter(
    Annotated[JobEvents | JobEvent, Field(union_mode="left_to_right")]
)


def events_of(body: bytes | str, routing_key: str | None = None) -> list[JobEvent]:
    """The events one `job.*` message carries: one `JobEvent`, or a `JobEvents` batch.

    With `routing_key`, the message must be its sender's (a body signed for
    `job.parse.progress` is parse's). `ValueError` (pydantic's `ValidationError` among them)
    for a body that is neither, or not the key's.
    """
    parsed = _EVENT_BODY.validate_json(body)
    if routing_key is not None and parsed.routing_key != routing_key:
        raise ValueError(f"a message sent as {routing_key!r} says it is {parsed.routing_key!r}")
    return parsed.events if isinstance(parsed, JobEvents) else [parsed]


class WorkerHeartbeat(BaseModel):
    """What one stage process says of itself every few seconds (`worker.<stage>`), for
    `GET /v1/pipeline` and `sluice status`. Counters run from the process's start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    # `<host>:<pid>:<random>`: unique per process, stable for its life.
    worker_id: str
    stage: StageField
    host: str
    pid: int
    sluice_version: str
    started_at: datetime
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # How often this process sends one; a gateway calls it unhealthy after a few missed.
    every_s: float
    processed: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    # Deliveries in hand per lane (taken, not yet settled), and the jobs they belong to.
    in_hand: dict[str, int] = Field(default_factory=dict)
    in_hand_jobs: list[str] = Field(default_factory=list)
    # Sent once on a clean stop: the gateway forgets the worker instead of calling it dead.
    stopping: bool = False

    @property
    def routing_key(self) -> str:
        """`worker.<stage>`."""
        return routing.heartbeat_key(self.stage)


def of_message(
    stage: StageName, msg: Message, kind: EventKind, attempt: int, **facts: object
) -> JobEvent:
    """An event of `kind` about one message: its job, its unit of work, and `facts`."""
    index, count, chunks = msg.unit()
    return JobEvent.model_validate(
        {
            "job_id": msg.job_id,
            "document_id": msg.document_id,
            "stage": stage,
            "kind": kind,
            "attempt": attempt,
            "batch_index": index,
            "batch_count": count,
            "chunks": chunks,
            **facts,
        }
    )


def started(stage: StageName, msg: Message, attempt: int) -> JobEvent:
    """A stage began work on a message."""
    return of_message(stage, msg, "started", attempt)


def progress(stage: StageName, msg: Message, outputs: Sequence[Message], attempt: int) -> JobEvent:
    """A stage finished one message; what it learned (pages, chunk count) comes from its outputs."""
    parsed = next((o for o in outputs if isinstance(o, DocumentParsed)), None)
    total = next((o.chunks_total for o in outputs if isinstance(o, ChunkBatch)), None)
    language = next((o.language for o in outputs if isinstance(o, ChunkBatch) and o.language), None)
    facts: dict[str, object] = {
        "pages": parsed.pages if parsed else None,
        "chunks_total": total,
        "parsed_sha256": parsed.parsed_sha256 if parsed else None,
        "language": language,
    }
    if isinstance(msg, DocumentUploaded):
        facts.update(_pages_read(msg, outputs, parsed))
    return of_message(stage, msg, "progress", attempt, **facts)


def _pages_read(
    msg: DocumentUploaded, outputs: Sequence[Message], parsed: DocumentParsed | None
) -> dict[str, object]:
    """A parse counts pages read where other stages count chunks, so a job shows how far OCR
    got. The parse that splits a scan into n page ranges is unit 0 of n + 1 (each range is one
    more, `DocumentUploaded.unit`), and reads the pages that have a text layer."""
    ranges = [o.ocr_range for o in outputs if isinstance(o, DocumentUploaded) and o.ocr_range]
    if ranges and msg.ocr_range is None:
        total = ranges[0].pages_total
        to_read = sum(len(r.pages) for r in ranges)
        return {"batch_count": ranges[0].count + 1, "pages": total, "chunks": total - to_read}
    if msg.ocr_range is None and parsed is not None:
        return {"chunks": parsed.pages or 0}
    return {}


def retrying(stage: StageName, msg: Message, error: JobError, attempt: int) -> JobEvent:
    """Attempt `attempt` failed; the message waits in a retry tier and will be tried again."""
    return of_message(stage, msg, "retrying", attempt, error=error)


def failed(stage: StageName, msg: Message, error: JobError, attempt: int) -> JobEvent:
    """A stage gave up on a message; the job fails with `error`."""
    return of_message(stage, msg, "failed", attempt, error=error)
