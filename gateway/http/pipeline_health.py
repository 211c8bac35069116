"""What a gateway knows of the pipeline's health: workers from their heartbeats, queue samples,
rates over the last minute. Pure bookkeeping with the clock passed in; no AMQP here
(gateway/http/pipeline_monitor.py feeds it)."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from contracts import routing
from contracts.events import WorkerHeartbeat
from gateway.http.pipeline_schemas import (
    LaneDepth,
    PipelineOut,
    Rates,
    StageOut,
    StageSample,
    WorkerOut,
)

# A worker is healthy while its last heartbeat is younger than this many of its periods.
HEALTHY_PERIODS = 3
# A worker silent this long is forgotten (it died without saying so, long ago).
FORGET_AFTER_S = 600.0
# Rates are measured over this much of the latest samples.
WINDOW_S = 60.0


@dataclass
class _Worker:
    beat: WorkerHeartbeat
    seen: float  # monotonic
    seen_at: datetime
    # processed + failed already added to its stage's running total.
    counted: int

    def healthy(self, now: float) -> bool:
        return now - self.seen < HEALTHY_PERIODS * self.beat.every_s


@dataclass(frozen=True)
class _Sample:
    t: float  # monotonic
    at: datetime
    done: int  # the stage's running total of finished deliveries
    ready: dict[str, int]
    unacked: dict[str, int]
    consumers: dict[str, int]

    @property
    def backlog(self) -> int:
        return sum(self.ready.values()) + sum(self.unacked.values())


@dataclass
class _Stage:
    side: bool
    # Finished deliveries of every worker ever heard, so a worker that stops or dies keeps
    # its part of the rate (a per-worker counter restarts at 0 with its process).
    done: int = 0
    samples: deque[_Sample] = field(default_factory=deque)


def _rates(first: _Sample, last: _Sample) -> tuple[float, float]:
    """(in, out) per second between two samples; `in` is never negative."""
    dt = last.t - first.t
    if dt <= 0:
        return 0.0, 0.0
    out = (last.done - first.done) / dt
    return max(0.0, out + (last.backlog - first.backlog) / dt), out


class PipelineHealth:
    """Workers by heartbeat and queue samples per stage, answering `GET /v1/pipeline`."""

    def __init__(
        self, stages: Iterable[str], side: Iterable[str] = (), *, started_at: datetime
    ) -> None:
        self._stages = {name: _Stage(side=False) for name in stages}
        self._stages |= {name: _Stage(side=True) for name in side}
        self._workers: dict[str, _Worker] = {}
        # A worker started before this was heard has done work this gateway never saw.
        self._started_at = started_at

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages watched, pipeline order then side stages."""
        return tuple(self._stages)

    def hear(self, beat: WorkerHeartbeat, now: float, now_at: datetime) -> None:
        """Fold one heartbeat in: a new worker, a known one's news, or its goodbye."""
        stage = self._stages.get(beat.stage)
        if stage is None:
            return  # a stage this deployment does not run (another SLUICE_STAGES)
        known = self._workers.get(beat.worker_id)
        if known is not None and beat.at < known.beat.at:
            return  # an older heartbeat overtaken by a newer one
        done = beat.processed + beat.failed
        if known is None:
            counted = 0 if beat.started_at >= self._started_at else done
        else:
            counted = known.counted
        stage.done += max(0, done - counted)
        if beat.stopping:
            # A clean stop: gone, not dead.
            self._workers.pop(beat.worker_id, None)
            return
        self._workers[beat.worker_id] = _Worker(beat, now, now_at, max(counted, done))

    def prune(self, now: float) -> None:
        """Forget workers silent for longer than `FORGET_AFTER_S`."""
        for worker_id, worker in list(self._workers.items()):
            if now - worker.seen > FORGET_AFTER_S:
                del self._workers[worker_id]

    def unacked(self, stage: str, now: float) -> dict[str, int]:
        """Per lane, the deliveries healthy workers of `stage` hold."""
        held: dict[str, int] = dict.fromkeys(routing.LANES, 0)
        for worker in self._workers.values():
            if worker.beat.stage == stage and worker.healthy(now):
                for lane, count in worker.beat.in_hand.items():
                    held[lane] = held.get(lane, 0) + count
        return held

    def record(
        self,
        stage: str,
        ready: dict[str, int],
        consumers: dict[str, int],
        now: float,
        now_at: datetime,
    ) -> None:
        """Keep one sample of a stage's lanes; samples older than the window go."""
        kept = self._stages[stage]
        sample = _Sample(now, now_at, kept.done, ready, self.unacked(stage, now), consumers)
        kept.samples.append(sample)
        # One sample older than the window stays, so the window is covered end to end.
        while len(kept.samples) > 2 and kept.samples[1].t <= now - WINDOW_S:
            kept.samples.popleft()

    def last_sampled_at(self) -> datetime | None:
        """When the latest sample of any stage was taken."""
        times = [s.samples[-1].at for s in self._stages.values() if s.samples]
        return max(times) if times else None

    def in_hand_jobs(self) -> set[str]:
        """Every job any known worker holds."""
        return {job for w in self._workers.values() for job in w.beat.in_hand_jobs}

    def snapshot(
        self,
        now: float,
        *,
        stale: bool,
        gateway_id: str,
        visible_jobs: Collection[str] | None = None,
    ) -> PipelineOut:
        """The answer of `GET /v1/pipeline` as of `now` (`visible_jobs`: None shows every
        job id in hand, else only these)."""
        return PipelineOut(
            stages={
                name: self._stage_out(name, kept, now, visible_jobs)
                for name, kept in self._stages.items()
            },
            stale=stale,
            sampled_at=self.last_sampled_at(),
            gateway_id=gateway_id,
        )

    def _stage_out(
        self, name: str, kept: _Stage, now: float, visible_jobs: Collection[str] | None
    ) -> StageOut:
        last = kept.samples[-1] if kept.samples else None
        unacked = self.unacked(name, now)
        lanes = (*routing.LANES, *(last.ready if last else ()))
        queues = {
            lane: LaneDepth(
                ready=last.ready.get(lane, 0) if last else 0,
                unacked=unacked.get(lane, 0),
                consumers=last.consumers.get(lane, 0) if last else 0,
            )
            for lane in dict.fromkeys(lanes)
        }
        in_rate, out_rate = _rates(kept.samples[0], last) if last else (0.0, 0.0)
        workers = sorted(
            (w for w in self._workers.values() if w.beat.stage == name),
            key=lambda w: w.beat.started_at,
        )
        shown = [self._worker_out(w, now, visible_jobs) for w in workers]
        return StageOut(
            queues=queues,
            consumers=max((q.consumers for q in queues.values()), default=0),
            rate_per_s=Rates(in_=round(in_rate, 3), out=round(out_rate, 3)),
            workers=shown,
            healthy_workers=sum(w.healthy for w in shown),
            side=kept.side,
            history=_history(kept.samples),
        )

    @staticmethod
    def _worker_out(worker: _Worker, now: float, visible_jobs: Collection[str] | None) -> WorkerOut:
        beat = worker.beat
        jobs = [j for j in beat.in_hand_jobs if visible_jobs is None or j in visible_jobs]
        return WorkerOut(
            id=beat.worker_id,
            host=beat.host,
            pid=beat.pid,
            started_at=beat.started_at,
            last_seen_at=worker.seen_at,
            processed=beat.processed,
            failed=beat.failed,
            in_hand=jobs,
            in_hand_by_lane=dict(beat.in_hand),
            healthy=worker.healthy(now),
            sluice_version=beat.sluice_version,
            every_s=beat.every_s,
        )


def _history(samples: Iterable[_Sample]) -> list[StageSample]:
    """Each sample with the rates since the one before it."""
    out: list[StageSample] = []
    previous: _Sample | None = None
    for sample in samples:
        in_rate, out_rate = _rates(previous, sample) if previous else (0.0, 0.0)
        out.append(
            StageSample(
                at=sample.at,
                ready=sum(sample.ready.values()),
                unacked=sum(sample.unacked.values()),
                in_per_s=round(in_rate, 3),
                out_per_s=round(out_rate, 3),
            )
        )
        previous = sample
    return out


def utc_now() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)
