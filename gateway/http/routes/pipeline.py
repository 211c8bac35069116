"""`GET /v1/pipeline`: every stage's lanes, consumers, rates and workers, for operators."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.http.api_responses import KEYED, errors
from gateway.http.pipeline_monitor import PipelineMonitor
from gateway.http.pipeline_schemas import PipelineOut
from gateway.http.services import AccessDep, ServicesDep, require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=KEYED)


def get_monitor(request: Request) -> PipelineMonitor:
    """The gateway's pipeline monitor (started with the app)."""
    monitor: PipelineMonitor = request.app.state.pipeline_monitor
    return monitor


MonitorDep = Annotated[PipelineMonitor, Depends(get_monitor)]


@router.get("/pipeline", responses=errors({503: "job_store_unavailable"}))
async def pipeline(monitor: MonitorDep, services: ServicesDep, access: AccessDep) -> PipelineOut:
    """The pipeline as this gateway last heard and sampled it; `stale` while the broker is
    away. A key limited to some collections sees only their jobs among those in hand."""
    if access.unrestricted:
        return monitor.snapshot()
    held = monitor.in_hand_jobs()
    known = await asyncio.to_thread(services.store.collections_of, held) if held else {}
    return monitor.snapshot({job for job, coll in known.items() if access.allows(coll)})
