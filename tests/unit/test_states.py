"""The job state machine as pure functions: events in, status and progress out, no store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from contracts.events import JobError, JobEvent
from contracts.pipeline import build
from gateway.store import states
from gateway.store.states import JobState

PIPELINE = build("parse,chunk,enrich,embed,index")
AT = datetime(2026, 1, 1, tzinfo=UTC)


def _event(
    stage: str, kind: str = "progress", index: int = 0, count: int = 1, **kw: object
) -> JobEvent:
    return JobEvent.model_validate(
        {
            "job_id": "j",
            "document_id": "d",
            "stage": stage,
            "kind": kind,
            "batch_index": index,
            "batch_count": count,
            "at": AT + timedelta(seconds=index),
            **kw,
        }
    )


def _run(events: list[tuple[JobEvent, bool]]) -> JobState:
    state = JobState()
    for event, new in events:
        state = states.fold(state, event, new_unit=new, pipeline=PIPELINE)
    return state


def test_a_finished_stage_hands_the_job_to_the_next_one() -> None:
    state = _run([(_event("parse", pages=3), True)])
    assert state.status == "chunking"
    assert state.pages == 3
    state = _run([(_event("parse"), True), (_event("chunk", chunks_total=10), True)])
    assert state.status == "enriching"  # the optional stage sits between chunk and embed


def test_a_unit_counts_once_and_the_last_stage_decides_the_chunk_count() -> None:
    events = [
        (_event("parse"), True),
        (_event("chunk", chunks_total=10), True),
        (_event("index", index=0, count=2, chunks=4), True),
        (_event("index", index=0, count=2, chunks=4), False),  # a redelivery adds nothing
    ]
    state = _run(events)
    assert state.status == "indexing"
    assert state.stages["index"].units_done == 1
    state = _run([*events, (_event("index", index=1, count=2, chunks=1), True)])
    # A stage before the index dropped chunks: 5 were indexed, not the 10 chunk made.
    assert state.status == "indexed"
    assert state.chunks_total == 5
    assert state.stages["index"].finished_at == AT + timedelta(seconds=1)


def test_status_only_moves_forward_and_failure_is_terminal() -> None:
    error = JobError(stage="embed", code="x", message="broken", retryable=True)
    state = _run(
        [
            (_event("embed", kind="started"), False),
            (_event("parse"), True),
            (_event("embed", kind="failed", error=error.model_dump()), False),
            (_event("index", chunks=3), True),
        ]
    )
    assert state.status == "failed"
    assert state.error == error
    reopened = states.reopened(state, PIPELINE)
    assert reopened is not None
    assert (reopened.status, reopened.error) == ("embedding", None)
    assert states.reopened(reopened, PIPELINE) is None


def test_the_first_batch_names_the_language() -> None:
    state = _run(
        [
            (_event("enrich", index=1, count=2, language="fr"), True),
            (_event("enrich", index=0, count=2, language="en"), True),
            (_event("embed", index=1, count=2, language="de"), True),
        ]
    )
    assert state.language == "en"


def test_an_unknown_stage_is_timed_but_never_moves_the_status() -> None:
    state = _run([(_event("parse"), True), (_event("gone"), True)])
    assert state.status == "chunking"
    assert state.stages["gone"].units_done == 1


def test_a_retry_is_an_attempt_of_a_pipeline_stage_and_nothing_else() -> None:
    error = {"stage": "embed", "code": "x", "message": "model away", "retryable": True}
    state = _run([(_event("embed", kind="retrying", attempt=2, error=error), False)])
    assert (state.status, state.error, state.stages["embed"].attempts) == ("embedding", None, 2)
    # Not a stage of this pipeline, or a side stage: the job does not move at all.
    for stage in ("gone", "webhook"):
        assert _run([(_event(stage, kind="retrying", attempt=3, error=error), False)]) == JobState()
    failed = {**error, "stage": "webhook"}
    assert _run([(_event("webhook", kind="failed", error=failed), False)]) == JobState()


def test_a_webhook_is_delivered_retried_or_failed_and_stays_delivered() -> None:
    error = JobError(stage="webhook", code="http_500", message="500 from receiver", retryable=True)

    def hook(kind: str, attempt: int = 1, *, broke: bool = False) -> JobEvent:
        return _event("webhook", kind=kind, attempt=attempt, error=error if broke else None)

    pending = states.Webhook("pending")
    assert states.webhook_after(None, hook("progress")) is None  # nothing due: nothing to move
    started = states.webhook_after(pending, hook("started", 2))
    assert started == states.Webhook("pending", attempts=2)
    retrying = states.webhook_after(started, hook("retrying", 2, broke=True))
    assert retrying == states.Webhook("retrying", 2, "500 from receiver")
    delivered = states.webhook_after(retrying, hook("progress", 3))
    assert delivered == states.Webhook("delivered", 3, "500 from receiver")
    late = states.webhook_after(delivered, hook("failed", 2, broke=True))
    assert late == delivered
