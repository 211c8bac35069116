"""Dead letters: what the pipeline gave up on, and sending it back to the stage that failed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from contracts.errors import Transient
from contracts.events import JobEvent
from gateway.http.api_responses import KEYED, errors
from gateway.http.errors import ApiError
from gateway.http.schemas import DeadLetterOut, DeadLetters, Job, ReplayAnswer, ReplayRequest
from gateway.http.services import Access, AccessDep, Services, ServicesDep, require_api_key
from gateway.http.uploads import RETRY_AFTER_S
from stages.infra import dead_letter_queue as dlq
from stages.infra.broker import PublishRejected

router = APIRouter(
    prefix="/v1/dead-letters", dependencies=[Depends(require_api_key)], responses=KEYED
)


def _broker_trouble(exc: Transient) -> ApiError:
    if isinstance(exc, PublishRejected):
        return ApiError(
            429, "pipeline_saturated", "The pipeline is full; try again shortly.", RETRY_AFTER_S
        )
    return ApiError(503, "broker_unavailable", f"The message broker failed: {exc}", RETRY_AFTER_S)


def _require_broker(services: Services) -> None:
    if not services.broker.is_connected:
        raise ApiError(
            503,
            "broker_unavailable",
            "The message broker is unreachable; try again shortly.",
            RETRY_AFTER_S,
        )


async def _visible_letters(
    services: Services, access: Access
) -> list[tuple[dlq.DeadLetter, str | None]]:
    """The dead letters the caller may see, each with its job's collection (None: unknown)."""
    letters = await dlq.list_dead_letters(services.broker)
    job_ids = {lt.job_id for lt in letters if lt.job_id}
    known = await asyncio.to_thread(services.store.collections_of, job_ids)
    visible = []
    for letter in letters:
        collection = known.get(letter.job_id or "")
        # A letter no job owns could come from any collection: only an unrestricted key sees it.
        mine = access.allows(collection) if collection else access.unrestricted
        if mine:
            visible.append((letter, collection))
    return visible


@router.get(
    "",
    responses=errors(
        {429: "pipeline_saturated", 503: ["broker_unavailable", "job_store_unavailable"]}
    ),
)
async def list_letters(services: ServicesDep, access: AccessDep) -> DeadLetters:
    """Every dead letter of the caller's collections, oldest first; the queue is unchanged."""
    _require_broker(services)
    try:
        letters = await _visible_letters(services, access)
    except Transient as exc:
        raise _broker_trouble(exc) from exc
    now = time.time()
    return DeadLetters(
        dead_letters=[
            DeadLetterOut(
                job_id=letter.job_id,
                collection=collection,
                stage=letter.stage,
                code=letter.code,
                reason=letter.reason,
                attempts=letter.attempts,
                dead_at=datetime.fromtimestamp(letter.dead_at, UTC) if letter.dead_at else None,
                age_s=round(max(0.0, now - letter.dead_at), 1) if letter.dead_at else None,
            )
            for letter, collection in letters
        ]
    )


@router.post(
    "/replay",
    responses=errors(
        {
            429: "pipeline_saturated",
            503: ["broker_unavailable", "job_store_unavailable"],
        }
    ),
)
async def replay(
    services: ServicesDep,
    access: AccessDep,
    selector: Annotated[ReplayRequest | None, Body()] = None,
) -> ReplayAnswer:
    """Send the chosen dead letters back to the stage they failed in, reopening their jobs."""
    if selector is None or not (selector.all or selector.stage or selector.job_id):
        raise ApiError(
            400,
            "invalid_request",
            'Say which dead letters to replay: {"stage": ...}, {"job_id": ...} or {"all": true}.',
        )
    _require_broker(services)

    def chosen(letter: dlq.DeadLetter) -> bool:
        return (
            letter.stage is not None
            and (not selector.stage or letter.stage == selector.stage)
            and (not selector.job_id or letter.job_id == selector.job_id)
        )

    try:
        listed = Counter(
            lt.job_id for lt, _ in await _visible_letters(services, access) if chosen(lt)
        )
    except Transient as exc:
        raise _broker_trouble(exc) from exc
    # Reopened first: the stage's events for a job still marked failed would be ignored.
    reopened = await asyncio.to_thread(_reopen, services, [job_id for job_id in listed if job_id])
    replayed: Counter[str | None] = Counter()
    try:
        # Letters of jobs not in the listing (newly dead, or not the caller's) wait for next time.
        async for letter in dlq.replay_each(
            services.broker, lambda lt: chosen(lt) and lt.job_id in listed
        ):
            replayed[letter.job_id] += 1
    except BaseException as exc:
        for job_id, before in reopened.items():
            if replayed[job_id] < listed[job_id]:
                await _fail_again(services, before)
        if isinstance(exc, Transient):
            raise _broker_trouble(exc) from exc
        raise
    finally:
        for job_id in reopened:
            services.changes.notify(job_id)
    for job_id, before in reopened.items():
        if not replayed[job_id]:
            # Its letters were gone by the time of the replay: nothing is in flight for it.
            await _fail_again(services, before)
    return ReplayAnswer(
        replayed=sum(replayed.values()), jobs=[job_id for job_id in replayed if job_id]
    )


def _reopen(services: Services, job_ids: list[str]) -> dict[str, Job]:
    """Put failed jobs back in flight; returns each reopened job as it was before."""
    reopened = {}
    for job_id in job_ids:
        job = services.store.get(job_id)
        if job is not None and job.status == "failed" and services.store.reopen(job_id):
            reopened[job_id] = job
    return reopened


async def _fail_again(services: Services, before: Job) -> None:
    """Put a reopened job back to failed with the error it had."""
    if before.error is None:
        return
    await asyncio.to_thread(
        services.store.apply,
        JobEvent(
            job_id=before.job_id,
            document_id=before.document_id,
            stage=before.error.stage,
            kind="failed",
            error=before.error,
        ),
    )
    services.changes.notify(before.job_id)
