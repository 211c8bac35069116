"""`GET /v1/pipeline` from a real gateway app on a real broker, fed heartbeats by the test:
lanes sampled from the broker, workers healthy then not, forgotten when they say goodbye,
scoped keys, the gateway's own heartbeat queue, and a broker that goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from broker import BrokerHandle, PrivateBroker
from fastapi import FastAPI
from pipeline import credentials

from contracts import routing
from contracts.events import WorkerHeartbeat
from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.pipeline_monitor import PipelineMonitor
from stages.infra.broker import Broker

KEY = "ops-key"
SCOPED = "scoped-key"
DEADLINE_S = 30.0
EVERY_S = 0.5

Answer = dict[str, Any]


def settings_for(broker: BrokerHandle, root: Path, **extra: Any) -> Settings:
    """A gateway of its own namespace on the test broker."""
    return Settings(
        amqp_url=broker.amqp_url,
        namespace=f"m{uuid.uuid4().hex[:8]}",
        data_dir=root,
        heartbeat_every_s=EVERY_S,
        api_keys=f"{KEY},{SCOPED}:mine",
        **extra,
    )


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app, its lifespan run (broker, tracker, monitor), reached in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", headers=headers
        ) as client:
            yield app, client


async def wait_for(
    client: httpx.AsyncClient, ok: Callable[[Answer], bool], what: str, key: str = KEY
) -> Answer:
    """Ask `GET /v1/pipeline` until `ok(answer)` or the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    answer: Answer = {}
    while time.monotonic() < deadline:
        response = await client.get("/v1/pipeline", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        answer = response.json()
        if ok(answer):
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not seen in {DEADLINE_S}s; last answer {answer}")


def heartbeat(worker: str, stage: str = "parse", **fields: Any) -> WorkerHeartbeat:
    """A heartbeat as a stage process sends it, sent now."""
    values: dict[str, Any] = {
        "worker_id": worker,
        "stage": stage,
        "host": "test-host",
        "pid": 321,
        "sluice_version": "test",
        "started_at": datetime.now(UTC),
        "every_s": EVERY_S,
        **fields,
    }
    return WorkerHeartbeat(**values)


async def beat_every(sender: Broker, beat: WorkerHeartbeat) -> None:
    """Send a worker's heartbeat every period until cancelled, as a live stage process does."""
    while True:
        await sender.publish(beat.model_copy(update={"at": datetime.now(UTC)}))
        await asyncio.sleep(beat.every_s)


def workers(answer: Answer, stage: str = "parse") -> dict[str, Answer]:
    """The workers of one stage, by id."""
    return {w["id"]: w for w in answer["stages"][stage]["workers"]}


async def test_lanes_workers_and_their_health_from_heartbeats_and_the_broker(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    settings = settings_for(broker, tmp_path)
    ns = settings.namespace
    async with gateway(settings) as (app, client):
        assert (await client.get("/v1/pipeline", headers={"Authorization": ""})).status_code == 401
        # Every stage of the pipeline, then the side stage, each with both lanes.
        answer = await wait_for(client, lambda a: not a["stale"], "the monitor listening")
        assert list(answer["stages"]) == ["parse", "chunk", "embed", "index", "webhook"]
        assert answer["stages"]["webhook"]["side"] is True
        assert all(set(s["queues"]) == {"interactive", "bulk"} for s in answer["stages"].values())

        sender = Broker(settings)
        await sender.connect()
        try:
            # Two messages wait in parse's bulk lane, which nothing consumes.
            for n in range(2):
                await sender.publish_raw("", routing.stage_queue(ns, "parse", "bulk"), b"%d" % n)
            w1 = heartbeat("w1", processed=3, in_hand={"bulk": 1}, in_hand_jobs=["job-1"])
            beating = asyncio.create_task(beat_every(sender, w1))
            answer = await wait_for(
                client,
                lambda a: (
                    a["stages"]["parse"]["queues"]["bulk"]["ready"] == 2 and "w1" in workers(a)
                ),
                "parse's bulk lane and its worker",
            )
            parse = answer["stages"]["parse"]
            assert parse["queues"]["bulk"]["unacked"] == 1
            assert parse["queues"]["interactive"] == {"ready": 0, "unacked": 0, "consumers": 0}
            seen = workers(answer)["w1"]
            assert (seen["healthy"], seen["processed"], seen["in_hand"]) == (True, 3, ["job-1"])
            assert set(seen) >= {"id", "host", "pid", "started_at", "last_seen_at", "failed"}
            assert set(parse["rate_per_s"]) == {"in", "out"}

            # A key limited to one collection does not see other collections' jobs in hand.
            scoped = await wait_for(client, lambda a: "w1" in workers(a), "scoped", key=SCOPED)
            assert workers(scoped)["w1"]["in_hand"] == []

            # Silent for three periods: unhealthy, and what it held no longer counts.
            beating.cancel()
            answer = await wait_for(
                client, lambda a: not workers(a)["w1"]["healthy"], "w1 turning unhealthy"
            )
            assert answer["stages"]["parse"]["queues"]["bulk"]["unacked"] == 0

            # A clean stop says goodbye: the worker is forgotten, not called dead.
            await sender.publish(heartbeat("w2", stage="chunk"))
            await wait_for(client, lambda a: "w2" in workers(a, "chunk"), "w2 heard")
            await sender.publish(heartbeat("w2", stage="chunk", stopping=True))
            await wait_for(client, lambda a: workers(a, "chunk") == {}, "w2 forgotten")
        finally:
            await sender.close()

        monitor: PipelineMonitor = app.state.pipeline_monitor
        queue = await management_queue(broker, monitor.queue_name)
        assert (queue["durable"], queue["auto_delete"]) == (False, True)
        assert queue["arguments"]["x-message-ttl"] > 0
        bindings = await management_bindings(broker, monitor.queue_name)
        assert routing.WORKER_HEARTBEATS in bindings


async def test_with_the_broker_away_the_answer_is_what_it_last_knew_and_says_so(
    own_broker: PrivateBroker, tmp_path: Path
) -> None:
    settings = settings_for(own_broker, tmp_path)
    async with gateway(settings) as (_, client):
        await wait_for(client, lambda a: not a["stale"], "the monitor listening")
        sender = Broker(settings)
        await sender.connect()
        try:
            await sender.publish(heartbeat("w1", processed=5))
        finally:
            await sender.close()
        await wait_for(client, lambda a: "w1" in workers(a), "w1 heard")

        await asyncio.to_thread(own_broker.kill)
        answer = await wait_for(client, lambda a: a["stale"], "the answer marked stale")
        # The worker is still listed with what was last heard of it.
        assert workers(answer)["w1"]["processed"] == 5
        assert answer["sampled_at"] is not None


async def management_queue(broker: BrokerHandle, name: str) -> Answer:
    """One queue's properties, from the management API."""
    async with httpx.AsyncClient(auth=credentials(broker.amqp_url)) as api:
        answer = await api.get(f"{broker.management_url}/api/queues/%2F/{name}")
    assert answer.status_code == 200, answer.text
    queue: Answer = answer.json()
    return queue


async def management_bindings(broker: BrokerHandle, name: str) -> set[str]:
    """The routing keys a queue is bound with."""
    async with httpx.AsyncClient(auth=credentials(broker.amqp_url)) as api:
        answer = await api.get(f"{broker.management_url}/api/queues/%2F/{name}/bindings")
    assert answer.status_code == 200, answer.text
    return {b["routing_key"] for b in answer.json()}
