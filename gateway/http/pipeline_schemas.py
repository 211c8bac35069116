"""The JSON of `GET /v1/pipeline` (see shared/API.md): the stages, their lanes and workers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class LaneDepth(BaseModel):
    """One lane's queue of one stage: waiting in the broker, and in workers' hands."""

    ready: int
    # What healthy workers say they hold (taken, not settled), not the broker's count.
    unacked: int
    consumers: int = 0


class Rates(BaseModel):
    """Messages a second over the last minute: arriving (`in`) and finished (`out`)."""

    model_config = ConfigDict(populate_by_name=True)

    in_: float = Field(alias="in")
    out: float


class WorkerOut(BaseModel):
    """One stage process, as its heartbeats describe it."""

    id: str
    host: str
    pid: int
    started_at: datetime
    # When this gateway last heard it (its own clock, so hosts' clocks need not agree).
    last_seen_at: datetime
    processed: int
    failed: int
    # The jobs its deliveries in hand belong to (only those of the caller's collections).
    in_hand: list[str]
    in_hand_by_lane: dict[str, int]
    healthy: bool
    sluice_version: str
    every_s: float


class StageSample(BaseModel):
    """One sample of the last minute, for a throughput chart."""

    at: datetime
    ready: int
    unacked: int
    in_per_s: float
    out_per_s: float


class StageOut(BaseModel):
    """One stage: its lanes' depths, consumers, rates and workers."""

    queues: dict[str, LaneDepth]
    # Consumers of the busier lane: every worker consumes each lane once.
    consumers: int
    rate_per_s: Rates
    workers: list[WorkerOut]
    healthy_workers: int
    # A side stage (the webhook sender) runs beside the document pipeline, not in it.
    side: bool = False
    history: list[StageSample] = Field(default_factory=list)


class PipelineOut(BaseModel):
    """Every stage of the deployment, pipeline order then side stages."""

    stages: dict[str, StageOut]
    # True while this gateway cannot reach the broker: the numbers are what it last knew.
    stale: bool
    # When the queues were last sampled (null before the first sample).
    sampled_at: datetime | None
    gateway_id: str
