"""Worker health from real stage processes: every stage's workers heard and healthy, a stage
process killed turns unhealthy, started again appears as a new healthy worker; and
`sluice status` shows the same, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from pipeline import Pipeline, launch, run_sluice, sluice_command, stop_pipeline

DEADLINE_S = 60.0
Answer = dict[str, Any]


@pytest.fixture(scope="module")
def beating(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The pipeline and the webhook side stage, each process beating twice a second."""
    running = launch(
        broker,
        tmp_path_factory.mktemp("health"),
        {"SLUICE_HEARTBEAT_EVERY_S": "0.5", "SLUICE_WEBHOOK_METRICS_PORT": "0"},
        commands={"webhook": [*sluice_command(), "stage", "webhook"]},
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


async def wait_for(api: httpx.AsyncClient, ok: Callable[[Answer], bool], what: str) -> Answer:
    """Ask `GET /v1/pipeline` until `ok(answer)` or the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    answer: Answer = {}
    while time.monotonic() < deadline:
        response = await api.get("/v1/pipeline")
        assert response.status_code == 200, response.text
        answer = response.json()
        if ok(answer):
            return answer
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not seen in {DEADLINE_S}s; last answer {answer}")


def by_pid(answer: Answer, stage: str) -> dict[int, Answer]:
    """A stage's workers by process id."""
    return {w["pid"]: w for w in answer["stages"][stage]["workers"]}


def all_healthy(pipeline: Pipeline) -> Callable[[Answer], bool]:
    """Whether every running process's worker is heard and healthy."""

    def ok(answer: Answer) -> bool:
        for stage in (*pipeline.stages, "webhook"):
            worker = by_pid(answer, stage).get(pipeline.processes[stage].pid)
            if worker is None or not worker["healthy"]:
                return False
        return True

    return ok


async def test_a_killed_stage_process_turns_unhealthy_and_its_restart_appears_healthy(
    beating: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=beating.url, timeout=30) as api:
        answer = await wait_for(api, all_healthy(beating), "every stage's worker healthy")
        assert list(answer["stages"]) == [*beating.stages, "webhook"]
        for name, stage in answer["stages"].items():
            assert stage["consumers"] >= 1, (name, stage)
            assert set(stage["queues"]) == {"interactive", "bulk"}
        old_pid = beating.processes["parse"].pid
        old_id = by_pid(answer, "parse")[old_pid]["id"]

        beating.kill("parse")
        answer = await wait_for(
            api, lambda a: not by_pid(a, "parse")[old_pid]["healthy"], "the killed worker unhealthy"
        )
        # The others are still heard: only the killed one is unwell.
        assert all(w["healthy"] for w in answer["stages"]["chunk"]["workers"])

        beating.start("parse")
        new_pid = beating.processes["parse"].pid
        answer = await wait_for(
            api,
            lambda a: by_pid(a, "parse").get(new_pid, {}).get("healthy", False),
            "the restarted worker healthy",
        )
        parse = by_pid(answer, "parse")
        assert parse[new_pid]["id"] != old_id
        assert parse[old_pid]["healthy"] is False

    # `sluice status` as an operator runs it (piped, so tab-separated rows).
    result = await asyncio.to_thread(run_sluice, beating, "status")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    stage_rows = {row[0]: row for row in rows if row[0] != "stage" and len(row) == 7}
    assert list(stage_rows) == [*beating.stages, "webhook (side)"]
    assert stage_rows["chunk"][-1] == "1/1"
    assert stage_rows["parse"][-1] == "1/2"
    worker_rows = {row[3]: row for row in rows if len(row) == 9 and row[0] != "stage"}
    assert worker_rows[str(new_pid)][0] == "parse" and worker_rows[str(new_pid)][-1] == "yes"
    assert worker_rows[str(old_pid)][-1] == "NO"

    as_json = await asyncio.to_thread(run_sluice, beating, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert set(json.loads(as_json.stdout)["stages"]) == {*beating.stages, "webhook"}
