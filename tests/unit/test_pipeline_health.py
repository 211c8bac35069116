"""The pipeline's health bookkeeping with the clock in the test's hands: when a worker is
healthy, forgotten or dropped, what counts as unacked, and the rates over the last minute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.events import WorkerHeartbeat
from gateway.http.pipeline_health import FORGET_AFTER_S, PipelineHealth

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """The wall clock `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def beat(worker: str, stage: str = "parse", *, t: float = 0.0, **fields: Any) -> WorkerHeartbeat:
    """A heartbeat sent at T0 + t by a worker that started at T0 + 1 (after the gateway)."""
    values: dict[str, Any] = {
        "worker_id": worker,
        "stage": stage,
        "host": "box",
        "pid": 4242,
        "sluice_version": "0.1.0",
        "started_at": at(1),
        "at": at(t),
        "every_s": 1.0,
        **fields,
    }
    return WorkerHeartbeat(**values)


def health() -> PipelineHealth:
    return PipelineHealth(("parse", "chunk"), ("webhook",), started_at=T0)


def idle() -> dict[str, int]:
    return {"interactive": 0, "bulk": 0}


def test_every_stage_is_answered_in_order_side_stages_last_even_with_nothing_heard() -> None:
    answer = health().snapshot(0.0, stale=True, gateway_id="g")
    assert list(answer.stages) == ["parse", "chunk", "webhook"]
    assert [s.side for s in answer.stages.values()] == [False, False, True]
    parse = answer.stages["parse"]
    assert set(parse.queues) == {"interactive", "bulk"}
    assert parse.workers == [] and parse.consumers == 0
    assert answer.stale and answer.sampled_at is None
    body = answer.model_dump(mode="json", by_alias=True)
    assert body["stages"]["parse"]["rate_per_s"] == {"in": 0.0, "out": 0.0}


def test_a_worker_is_healthy_until_three_of_its_periods_pass_in_silence() -> None:
    known = health()
    known.hear(beat("w1", every_s=2.0), now=100.0, now_at=at(0))

    def healthy(now: float) -> bool:
        (worker,) = known.snapshot(now, stale=False, gateway_id="g").stages["parse"].workers
        return worker.healthy

    assert healthy(100.0) and healthy(105.9)
    assert not healthy(106.0)
    known.hear(beat("w1", t=7, every_s=2.0), now=107.0, now_at=at(7))
    assert healthy(107.0)


def test_a_worker_that_says_it_stops_is_forgotten_and_a_silent_one_dropped_after_ten_minutes() -> (
    None
):
    known = health()
    known.hear(beat("leaving"), now=0.0, now_at=at(0))
    known.hear(beat("silent"), now=0.0, now_at=at(0))
    known.hear(beat("leaving", t=1, stopping=True), now=1.0, now_at=at(1))
    ids = [w.id for w in known.snapshot(1.0, stale=False, gateway_id="g").stages["parse"].workers]
    assert ids == ["silent"]

    known.prune(FORGET_AFTER_S - 1)
    workers = known.snapshot(FORGET_AFTER_S - 1, stale=False, gateway_id="g").stages["parse"]
    assert [(w.id, w.healthy) for w in workers.workers] == [("silent", False)]
    known.prune(FORGET_AFTER_S + 1)
    assert (
        known.snapshot(FORGET_AFTER_S + 1, stale=False, gateway_id="g").stages["parse"].workers
        == []
    )


def test_an_older_heartbeat_arriving_late_does_not_undo_a_newer_one() -> None:
    known = health()
    known.hear(beat("w1", t=5, processed=9), now=5.0, now_at=at(5))
    known.hear(beat("w1", t=4, processed=7), now=5.1, now_at=at(5.1))
    (worker,) = known.snapshot(5.1, stale=False, gateway_id="g").stages["parse"].workers
    assert worker.processed == 9


def test_unacked_is_what_healthy_workers_hold_per_lane() -> None:
    known = health()
    known.hear(beat("a", in_hand={"interactive": 2, "bulk": 1}), now=0.0, now_at=at(0))
    known.hear(beat("b", in_hand={"interactive": 3}), now=0.0, now_at=at(0))
    known.hear(beat("dead", in_hand={"bulk": 7}), now=-10.0, now_at=at(-10))
    known.hear(beat("c", "chunk", in_hand={"bulk": 5}), now=0.0, now_at=at(0))
    queues = known.snapshot(0.0, stale=False, gateway_id="g").stages["parse"].queues
    assert (queues["interactive"].unacked, queues["bulk"].unacked) == (5, 1)


def test_rates_come_from_finished_work_and_the_change_in_backlog() -> None:
    known = health()
    known.hear(beat("w1", processed=0), now=0.0, now_at=at(0))
    known.record("parse", {"interactive": 30, "bulk": 0}, idle(), 0.0, at(0))
    # In 10 s the worker finished 20 (2 of them failed) and the backlog grew by 10: 3/s came in.
    known.hear(beat("w1", t=10, processed=18, failed=2), now=10.0, now_at=at(10))
    known.record("parse", {"interactive": 40, "bulk": 0}, idle(), 10.0, at(10))
    parse = known.snapshot(10.0, stale=False, gateway_id="g").stages["parse"]
    assert (parse.rate_per_s.in_, parse.rate_per_s.out) == (3.0, 2.0)
    assert parse.queues["interactive"].ready == 40
    assert [(s.ready, s.out_per_s) for s in parse.history] == [(30, 0.0), (40, 2.0)]


def test_in_is_never_negative_and_a_worker_that_left_keeps_its_part_of_the_rate() -> None:
    known = health()
    known.hear(beat("w1"), now=0.0, now_at=at(0))
    known.record("parse", {"interactive": 50}, idle(), 0.0, at(0))
    known.hear(beat("w1", t=5, processed=10, stopping=True), now=5.0, now_at=at(5))
    # A worker started later is counted from 0; the queue drained faster than work finished
    # (purged by hand): in stays at 0.
    known.hear(beat("w2", started_at=at(6), t=9, processed=10), now=9.0, now_at=at(9))
    known.record("parse", {"interactive": 0}, idle(), 10.0, at(10))
    rates = known.snapshot(10.0, stale=False, gateway_id="g").stages["parse"].rate_per_s
    assert (rates.in_, rates.out) == (0.0, 2.0)


def test_a_worker_older_than_the_gateway_counts_only_what_it_did_since() -> None:
    known = health()
    known.hear(beat("old", started_at=at(-3600), processed=5000), now=0.0, now_at=at(0))
    known.record("parse", idle(), idle(), 0.0, at(0))
    known.hear(beat("old", started_at=at(-3600), t=4, processed=5008), now=4.0, now_at=at(4))
    known.record("parse", idle(), idle(), 4.0, at(4))
    assert known.snapshot(4.0, stale=False, gateway_id="g").stages["parse"].rate_per_s.out == 2.0


def test_samples_older_than_a_minute_leave_the_window() -> None:
    known = health()
    for second in range(0, 200, 2):
        known.record("parse", {"interactive": second}, idle(), float(second), at(second))
    history = known.snapshot(198.0, stale=False, gateway_id="g").stages["parse"].history
    # The oldest sample kept is the one at the window's edge (a minute before the newest).
    assert [s.ready for s in history][:2] == [138, 140] and history[-1].ready == 198
    assert len(history) == 31


def test_only_the_visible_jobs_in_hand_are_shown() -> None:
    known = health()
    known.hear(beat("w1", in_hand_jobs=["mine", "theirs"]), now=0.0, now_at=at(0))
    assert known.in_hand_jobs() == {"mine", "theirs"}
    (worker,) = (
        known.snapshot(0.0, stale=False, gateway_id="g", visible_jobs={"mine"})
        .stages["parse"]
        .workers
    )
    assert worker.in_hand == ["mine"]


def test_heartbeats_of_a_stage_this_deployment_does_not_run_are_ignored() -> None:
    known = health()
    known.hear(beat("w1", "enrich"), now=0.0, now_at=at(0))
    answer = known.snapshot(0.0, stale=False, gateway_id="g")
    assert "enrich" not in answer.stages
    assert all(stage.workers == [] for stage in answer.stages.values())
