"""Workers die mid-message: `kill -9` of each stage while it holds work, a message that kills
its worker, and a SIGTERM while the stage is busy.

Each test proves what it is about from what the stages themselves say: a stage that is handed
a message that was in hand when its worker went away logs that it runs it alone
(`REDELIVERED`, stages/runtime/isolation.py); a draining stage logs how many messages it
finishes, then each one as done.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from pathlib import Path

import httpx
from broker import BrokerHandle
from documents import make_markdown
from fakes.crashing_embed import CRASH_MARKER
from fakes.gated_stage import GATE_ENV, held_marker
from invariants import assert_nothing_lost
from pipeline import wait_for_job

from contracts import routing
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGE_NAMES
from faults.conftest import (
    PipelineFactory,
    distinct_pdfs,
    upload,
    wait_for_depth,
    wait_for_log,
)

# What the runner logs when it is handed a message that was in hand, unsettled, before.
REDELIVERED = "time(s) before and never settled"
FAKES = Path(__file__).parents[1] / "fakes"


async def test_kill_9_of_each_stage_holding_work_loses_nothing(
    pipelines: PipelineFactory, broker: BrokerHandle, tmp_path: Path
) -> None:
    # Each stage's messages wait at a gate of its own, so a stage is killed while it surely
    # holds work (a fast stage would otherwise finish what it took before the kill).
    gates = str(tmp_path / "gate-{stage}")
    gated = {s: [sys.executable, str(FAKES / "gated_stage.py"), s] for s in STAGE_NAMES}
    # Two chunks a batch: every document is several batches, so each stage gets a backlog.
    pipeline = pipelines(commands=gated, SLUICE_CHUNKS_PER_MESSAGE="2", **{GATE_ENV: gates})
    settings = pipeline.settings()
    # Nothing moves until a stage is started: each one starts with more waiting than it takes.
    for stage in pipeline.stages:
        assert pipeline.terminate(stage) == 0
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(upload(api, name, data) for name, data in distinct_pdfs(12, pages=6).items())
        )
        assert [a.status_code for a in answers] == [202] * 12
        job_ids = [a.json()["job_id"] for a in answers]

        for stage in pipeline.stages:
            queue = routing.stage_queue(pipeline.namespace, stage)
            taken = settings.stage(stage).prefetch
            gate = Path(gates.format(stage=stage))
            # More than its prefetch waits, so it holds a full prefetch as soon as it consumes.
            await wait_for_depth(broker, queue, lambda depth: depth > taken)  # noqa: B023
            pipeline.start(stage)
            while not held_marker(gate).exists():
                assert pipeline.processes[stage].poll() is None, pipeline.logs()
                await asyncio.sleep(0.05)
            pipeline.kill(stage)
            mark = pipeline.log_mark(stage)
            pipeline.start(stage)
            # What the killed worker held comes back to the one started in its place.
            await wait_for_log(pipeline, stage, REDELIVERED, since=mark)
            gate.touch()

        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        assert [job["status"] for job in jobs] == ["indexed"] * 12, jobs
        await assert_nothing_lost(pipeline, api, job_ids)


async def test_a_message_that_kills_its_worker_kills_at_most_delivery_limit_workers(
    pipelines: PipelineFactory, broker: BrokerHandle
) -> None:
    limit = 3
    crashing_embed = [sys.executable, str(FAKES / "crashing_embed.py")]
    # The default prefetch: the poison batch is in hand beside every innocent one, and each
    # worker it kills hands them all back, counted as failed deliveries of theirs too.
    pipeline = pipelines(commands={"embed": crashing_embed}, SLUICE_DELIVERY_LIMIT=str(limit))
    assert pipeline.settings().stage("embed").prefetch > 8
    assert pipeline.terminate("embed") == 0
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        poison = await upload(
            api,
            "poison.md",
            make_markdown("Poison", {"Body": f"The sentence {CRASH_MARKER} is in here."}),
        )
        good = await asyncio.gather(
            *(
                upload(
                    api,
                    f"good-{n}.md",
                    make_markdown(
                        f"Good {n}", {"Body": f"Healthy document number {n} about orchards."}
                    ),
                )
                for n in range(6)
            )
        )
        job_ids = [poison.json()["job_id"], *(g.json()["job_id"] for g in good)]
        # Every document's one batch waits for embed, so the first worker takes them all.
        queue = routing.stage_queue(pipeline.namespace, "embed")
        await wait_for_depth(broker, queue, lambda depth: depth == len(job_ids))

        mark = pipeline.log_mark("embed")
        exits: list[int] = []
        stop = threading.Event()

        def supervise_embed() -> None:
            # What `sluice up` does: start the stage again whenever it dies.
            pipeline.start("embed")
            while not stop.is_set():
                if (code := pipeline.processes["embed"].poll()) is not None:
                    exits.append(code)
                    pipeline.start("embed")
                stop.wait(0.1)

        keeper = threading.Thread(target=supervise_embed, daemon=True)
        keeper.start()
        try:
            jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        finally:
            stop.set()
            keeper.join()
        assert jobs[0]["status"] == "failed", jobs[0]
        assert jobs[0]["error"]["code"] == "worker_crashed"
        assert jobs[0]["error"]["stage"] == "embed"
        assert [job["status"] for job in jobs[1:]] == ["indexed"] * 6, jobs[1:]
        await assert_nothing_lost(pipeline, api, job_ids)
    # The first worker died with innocent work in hand; it was handed back and ran alone.
    logged = pipeline.log_since("embed", mark)
    assert re.search(rf"good-\d\.md batch 1/1 was handed out 1 {re.escape(REDELIVERED)}", logged)
    assert set(exits) == {-9}, f"embed exited with {exits}: only the poison message kills it"
    kills = len(exits)
    assert 1 <= kills <= limit, f"one poison message killed {kills} workers; the limit is {limit}"


async def test_sigterm_drains_a_busy_stage_finishing_what_it_holds(
    pipelines: PipelineFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gated_embed = [sys.executable, str(FAKES / "gated_stage.py"), "embed"]
    # At DEBUG, embed logs each message it finishes, so the drain's can be counted.
    pipeline = pipelines(
        commands={"embed": gated_embed}, SLUICE_LOG_LEVEL="DEBUG", **{GATE_ENV: str(gate)}
    )
    mark = pipeline.log_mark("embed")
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        answers = await asyncio.gather(
            *(upload(api, n, d) for n, d in distinct_pdfs(8, pages=6, seed=3).items())
        )
        job_ids = [a.json()["job_id"] for a in answers]
        # Embed holds work it cannot finish until the gate opens, which is after the SIGTERM.
        while not held_marker(gate).exists():
            assert pipeline.processes["embed"].poll() is None, pipeline.logs()
            await asyncio.sleep(0.05)
        embed = pipeline.processes["embed"]
        embed.terminate()
        finishing = await wait_for_log(pipeline, "embed", "in-flight messages", since=mark)
        counted = re.search(r"finishing (\d+) in-flight", finishing)
        assert counted, finishing
        in_hand = int(counted.group(1))
        assert in_hand >= 1
        gate.touch()
        # Inside the drain timeout (30 s), with a margin for a busy machine.
        assert await asyncio.to_thread(embed.wait, 60) == 0
        drained = pipeline.log_since("embed", mark).split(finishing, 1)[1]
        done = re.findall(r"embed: (\S+ batch \d+/\d+) done in", drained)
        assert len(done) >= in_hand, f"{in_hand} in hand at SIGTERM, {len(done)} finished"

        mark = pipeline.log_mark("embed")
        pipeline.start("embed")
        jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
        assert [job["status"] for job in jobs] == ["indexed"] * len(job_ids), jobs
        await assert_nothing_lost(pipeline, api, job_ids)
    # Acked before the stage exited: the stage started in its place was handed none of what
    # the drain finished. (A delivery the broker sent after the drain began may come back.)
    again = re.findall(
        rf"embed: job \S+: (\S+ batch \d+/\d+) was handed out \d+ {re.escape(REDELIVERED)}",
        pipeline.log_since("embed", mark),
    )
    assert not set(again) & set(done), f"finished in the drain, then handed out again: {again}"
