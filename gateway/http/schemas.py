"""The API's JSON shapes (see shared/API.md): what clients read, named once."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import JobError
from contracts.messages import StageName
from contracts.routing import INTERACTIVE, Lane
from stages.backends.protocols import IndexHit

# A job's status: `queued`, one per stage of the pipeline (`parsing`, ...), `indexed` or
# `failed`; `contracts.pipeline.Pipeline.statuses` lists them in order.
JobStatus = str


class Progress(BaseModel):
    """How far a job got, in units a person understands."""

    pages: int | None = None
    # Pages read so far, from a text layer or with OCR: `pages` once parsing is done.
    pages_read: int = 0
    chunks_total: int | None = None
    chunks_embedded: int = 0
    chunks_indexed: int = 0


class StageTiming(BaseModel):
    """When a stage started and finished work on a job, and its highest attempt."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0


class QueuePlace(BaseModel):
    """Where a job waits (both null once it ended; gateway/store/queue_place.py says how
    they are estimated)."""

    # Documents of its lane ahead of it in its current stage (0 once that stage has it).
    position: int | None = None
    # Seconds until it ends, from how fast its lane finished jobs in the last minute.
    eta_s: float | None = None


WebhookStatus = Literal["pending", "retrying", "delivered", "failed"]


class WebhookState(BaseModel):
    """How the POST of a finished job to its callback URL is going (never the URL itself)."""

    status: WebhookStatus
    attempts: int = 0
    last_error: str | None = None
    # Which end of the job this is: a retried job that ends again is delivered again.
    round: int = 1


class Job(BaseModel):
    """One ingestion of one document version."""

    job_id: str
    document_id: str
    collection: str
    filename: str
    content_type: str
    size_bytes: int
    blob_sha256: str
    status: JobStatus
    progress: Progress
    stages: dict[StageName, StageTiming]
    # Detected by the optional enrich stage (ISO 639-1), else null.
    language: str | None = None
    error: JobError | None = None
    created_at: datetime
    updated_at: datetime
    trace_id: str | None = None
    # Not terminal and no event for longer than `stalled_after_s`: something may be stuck.
    stalled: bool = False
    # The stage a stalled job is stuck in (waiting in its queue, or in hand), else null.
    stalled_in: str | None = None
    # Its lane: `interactive` (someone waits) or `bulk` (an import).
    priority: Lane = INTERACTIVE
    # When it entered the pipeline; null while it waits in the store for its turn.
    admitted_at: datetime | None = None
    queue: QueuePlace = Field(default_factory=QueuePlace)
    webhook: WebhookState | None = None
    # Set on the jobs of a reindex (POST /v1/collections/{c}/reindex): they re-index a
    # document's version into a new generation and are no version of it themselves.
    reindex_id: str | None = None
    # The generation of the collection's index the job writes (contracts/generations.py).
    generation: int = 0


class SearchHit(BaseModel):
    """One search result, as the API returns it."""

    document_id: str
    filename: str
    chunk_id: str
    chunk_index: int
    page: int | None
    text: str
    score: float
    # With the optional enrich stage: the chunk's key phrases, best first.
    keywords: list[str] | None = None

    @classmethod
    def of(cls, hit: IndexHit) -> SearchHit:
        """The API's shape of an index hit."""
        return cls(
            document_id=hit.document_id,
            filename=hit.filename,
            chunk_id=hit.chunk_id,
            chunk_index=hit.chunk_index,
            page=hit.page,
            text=hit.text,
            score=hit.score,
            keywords=list(hit.keywords) if hit.keywords is not None else None,
        )


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[Job]
    next_cursor: str | None


class UploadAnswer(BaseModel):
    """The answer to an accepted (202) or duplicate (200) upload."""

    job_id: str
    document_id: str
    collection: str
    filename: str
    status: JobStatus
    status_url: str
    duplicate: bool = False


class DeadLetterOut(BaseModel):
    """A message the pipeline gave up on, and why."""

    job_id: str | None
    collection: str | None = None
    stage: StageName | None
    code: str
    reason: str
    attempts: int
    dead_at: datetime | None
    age_s: float | None


class DeadLetters(BaseModel):
    """Every dead letter the caller may see, oldest first."""

    dead_letters: list[DeadLetterOut]


class ReplayRequest(BaseModel):
    """Which dead letters to send back to their stage; at least one selector is needed."""

    model_config = ConfigDict(extra="forbid")

    stage: StageName | None = None
    job_id: str | None = None
    all: bool = False


class ReplayAnswer(BaseModel):
    """How many dead letters went back to their stage, and the jobs they belong to."""

    replayed: int
    jobs: list[str]
