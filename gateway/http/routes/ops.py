"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from gateway.http import gateway_metrics as metrics
from gateway.http.api_responses import errors, json_answer
from gateway.http.errors import error_response
from gateway.http.services import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


class Readiness(BaseModel):
    """What `/readyz` answers when the broker and the stores are reachable."""

    status: Literal["ready"]


@router.get(
    "/readyz",
    responses={
        **json_answer(200, Readiness, "The broker and the stores answer."),
        **errors({503: "not_ready"}),
    },
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """200 when the broker and the stores answer; else 503 naming the one that does not."""
    down = []
    if not services.broker.is_connected:
        down.append("broker")
    try:
        await asyncio.to_thread(services.store.ping)
    except Exception:
        down.append("job_store")
    try:
        await asyncio.to_thread(services.blobs.ping)
    except Exception:
        down.append("blob_store")
    if down:
        return error_response(503, "not_ready", f"Not reachable: {', '.join(down)}.", 5)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text exposition format."},
        **errors({503: "job_store_unavailable"}),
    },
)
async def prometheus(services: ServicesDep) -> Response:
    """Prometheus text format."""
    body, content_type = await asyncio.to_thread(
        metrics.render, services.store, services.settings.pipeline
    )
    return Response(body, media_type=content_type)
