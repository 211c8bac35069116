"""How job events fold into a job's status, progress and timings: pure functions, no SQL.

A store keeps the state; these functions decide what an event does to it, so every store
(SQLite here, another tomorrow) moves jobs the same way. The one thing a store must supply
is whether an event's unit of work (stage, batch index) is new: it knows that with a unique
constraint, so a redelivered event never counts twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from contracts.events import JobError, JobEvent
from contracts.pipeline import FAILED, INDEXED, QUEUED, Pipeline
from gateway.http.schemas import WebhookStatus

TERMINAL = frozenset({INDEXED, FAILED})


@dataclass(frozen=True)
class StageState:
    """One stage's part in a job: when it started and finished, its attempts, its units."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    units_done: int = 0
    chunks: int = 0


@dataclass(frozen=True)
class JobState:
    """Everything events change about a job."""

    status: str = QUEUED
    error: JobError | None = None
    pages: int | None = None
    chunks_total: int | None = None
    parsed_sha256: str | None = None
    language: str | None = None
    stages: dict[str, StageState] = field(default_factory=dict)


def later(pipeline: Pipeline, a: str, b: str) -> str:
    """The further of two statuses: events arrive out of order across stages, and a job's
    status only moves forward (a status this pipeline does not know never wins)."""
    order = pipeline.statuses
    if b not in order:
        return a
    if a not in order:
        return b
    return a if order.index(a) >= order.index(b) else b


def fold(state: JobState, event: JobEvent, *, new_unit: bool, pipeline: Pipeline) -> JobState:
    """The job after `event`; `new_unit` says whether its (stage, batch) was not counted yet."""
    if is_side(pipeline, event) or (event.kind == "retrying" and not pipeline.has(event.stage)):
        # A side stage's events (the webhook's) are no step of the job: `webhook_after` has
        # them; a retry is only counted as an attempt of a stage of the pipeline.
        return state
    stage = state.stages.get(event.stage, StageState())
    stage = replace(
        stage,
        started_at=stage.started_at or event.at,
        attempts=max(stage.attempts, event.attempt),
    )
    status, error = state.status, state.error
    facts = state
    if event.kind == "failed":
        if status not in TERMINAL:
            status, error = FAILED, event.error
    elif event.kind == "progress":
        if new_unit:
            stage = replace(
                stage, units_done=stage.units_done + 1, chunks=stage.chunks + event.chunks
            )
        facts = replace(
            state,
            pages=event.pages if event.pages is not None else state.pages,
            chunks_total=event.chunks_total
            if event.chunks_total is not None
            else state.chunks_total,
            parsed_sha256=event.parsed_sha256 or state.parsed_sha256,
            # A document's language is what its first batch says; others only fill a gap.
            language=(
                event.language
                if event.language and event.batch_index == 0
                else state.language or event.language
            ),
        )
        if stage.units_done >= event.batch_count:
            stage = replace(stage, finished_at=stage.finished_at or event.at)
            status = _after_stage(pipeline, status, event.stage)
    if status not in TERMINAL and pipeline.has(event.stage):
        status = later(pipeline, status, pipeline.spec(event.stage).status)
    chunks_total = facts.chunks_total
    if status == INDEXED and state.status != INDEXED:
        # Stages between chunk and index may drop or add chunks: once the index has every
        # batch, what it holds is the document's real chunk count.
        chunks_total = stage.chunks if event.stage == pipeline.last.name else chunks_total
    return replace(
        facts,
        status=status,
        error=error,
        chunks_total=chunks_total,
        stages={**state.stages, event.stage: stage},
    )


def ended(before: JobState, after: JobState) -> bool:
    """Whether the job has just ended (indexed or failed): its webhook, if any, is due."""
    return after.status in TERMINAL and before.status not in TERMINAL


def stage_of_status(pipeline: Pipeline, status: str) -> str | None:
    """The stage a job waits for or is in: the one whose status it has (`queued`: the first)."""
    if status == QUEUED:
        return pipeline.first.name
    return next((s.name for s in pipeline.stages if s.status == status), None)


def is_side(pipeline: Pipeline, event: JobEvent) -> bool:
    """Whether an event comes from a side stage (the webhook), not a step of the job."""
    return any(spec.name == event.stage for spec in pipeline.side)


def _after_stage(pipeline: Pipeline, status: str, stage: str) -> str:
    """A finished stage hands the job to the next one: it waits there, and saying
    "chunking" for a document already chunked would mislead."""
    if status in TERMINAL or not pipeline.has(stage):
        return status
    following = pipeline.next_of(stage)
    if following is None:
        return INDEXED
    return later(pipeline, status, following.status)


def reopened(state: JobState, pipeline: Pipeline) -> JobState | None:
    """A failed job put back in flight at the stage that failed (for a retry); None if the
    job is not failed."""
    if state.status != FAILED:
        return None
    failed_in = state.error.stage if state.error else None
    status = pipeline.spec(failed_in).status if failed_in and pipeline.has(failed_in) else QUEUED
    return replace(state, status=status, error=None)


@dataclass(frozen=True)
class Webhook:
    """Where the delivery of a finished job to its callback URL stands."""

    status: WebhookStatus
    attempts: int = 0
    last_error: str | None = None


def webhook_after(webhook: Webhook | None, event: JobEvent) -> Webhook | None:
    """The delivery after an event of the webhook side stage; such events never touch the
    job itself. A job with no delivery under way (no callback, or not ended) has none."""
    if webhook is None:
        return None
    attempts = max(webhook.attempts, event.attempt)
    message = event.error.message if event.error else webhook.last_error
    if event.kind == "progress":
        return replace(webhook, status="delivered", attempts=attempts)
    if webhook.status == "delivered":
        # A late retry report of the attempt before the one that got through.
        return replace(webhook, attempts=attempts)
    if event.kind == "retrying":
        return Webhook(status="retrying", attempts=event.attempt, last_error=message)
    if event.kind == "failed":
        return Webhook(status="failed", attempts=event.attempt, last_error=message)
    return replace(webhook, attempts=attempts)


def document_deleted(pipeline: Pipeline, status: str) -> JobError:
    """Why a job ends when its document is deleted before the job did: whatever its stages
    still do comes to nothing (the index drops it), so it must not look in flight for ever."""
    return JobError(
        stage=stage_of_status(pipeline, status) or pipeline.first.name,
        code="document_deleted",
        message=(
            "The document was deleted while this job was in progress: nothing of it stays in "
            "the index. Upload the file again to have it indexed."
        ),
        retryable=False,
    )


def superseded(pipeline: Pipeline) -> JobError:
    """Why a job that waited for admission ends without running: its document was replaced
    by a newer upload, or deleted, first (nothing of it was processed)."""
    return JobError(
        stage=pipeline.first.name,
        code="superseded",
        message=(
            "This upload waited for its turn and its document was replaced by a newer "
            "version, or deleted, first: nothing of it was processed."
        ),
        retryable=False,
    )
