"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from gateway.http import gateway_metrics as metrics
from gateway.http.errors import error_response
from gateway.http.services import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@router.get("/readyz")
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


@router.get("/metrics")
async def prometheus(services: ServicesDep) -> Response:
    """Prometheus text format."""
    body, content_type = await asyncio.to_thread(
        metrics.render, services.store, services.settings.pipeline
    )
    return Response(body, media_type=content_type)
