"""Sluice runs under the RabbitMQ permissions the README gives each role (a user for the
gateway and one per stage, never guest): a document goes through, is retried through a retry
tier, fails into the dead letters and is replayed by a job retry to the end. Under the same
permissions a stage cannot publish an upload or another stage's events, and the gateway
cannot publish job events or dead letters (contracts/broker_permissions.py)."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import aio_pika
import httpx
import pytest
from aiormq.exceptions import ChannelAccessRefused
from broker import PrivateBroker
from documents import make_markdown
from pipeline import launch, queue_consumers, sluice_command, stop_pipeline, wait_for_job

from contracts import routing
from contracts.broker_permissions import GATEWAY, roles
from contracts.settings import Settings

VHOST = "/"


def _url(broker: PrivateBroker, user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{broker.ports.amqp}/"


async def _publish(url: str, exchange: str, routing_key: str) -> None:
    """Publish one message as the user of `url`, waiting for the broker's answer."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key, timeout=10)
    finally:
        await connection.close()


async def test_each_role_runs_under_its_own_user_and_publishes_only_its_own(
    own_broker: PrivateBroker, tmp_path: Path
) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    declared = {r.role: r for r in roles(namespace, Settings(namespace=namespace).pipeline)}
    urls = {}
    for role in declared.values():
        password = secrets.token_hex(12)
        own_broker.rabbitmqctl("add_user", role.user, password)
        own_broker.rabbitmqctl(
            "set_permissions", "-p", VHOST, role.user, role.configure, role.write, role.read
        )
        for topic in role.topics:
            own_broker.rabbitmqctl(
                "set_topic_permissions",
                "-p",
                VHOST,
                role.user,
                topic.exchange,
                topic.write,
                topic.read,
            )
        urls[role.role] = _url(own_broker, role.user, password)
    assert set(urls) == {GATEWAY, "parse", "chunk", "embed", "index", "webhook"}

    pipeline = launch(
        own_broker,
        tmp_path,
        {},
        commands={"webhook": [*sluice_command(), "stage", "webhook"]},
        process_env={name: {"SLUICE_AMQP_URL": url} for name, url in urls.items()},
        namespace=namespace,
    )
    try:
        assert queue_consumers(own_broker, routing.stage_queue(namespace, "webhook")) >= 1
        # A plain file where the collection's table belongs makes its index writes fail.
        blocker = pipeline.data_dir / "index" / "chunks_roles.lance"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
            data = make_markdown("Roles", {"Gate": "Each role holds a key to its own door."})
            answer = await api.post(
                "/v1/documents", files={"file": ("roles.md", data)}, data={"collection": "roles"}
            )
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]
            failed = await wait_for_job(api, job_id)
            # Retried once through a retry tier (the default exchange), then dead-lettered.
            assert failed["status"] == "failed", (failed, pipeline.logs())
            assert failed["stages"]["index"]["attempts"] == 2, failed

            blocker.unlink()
            # The gateway replays the dead letter to the index stage's input.
            assert (await api.post(f"/v1/jobs/{job_id}/retry")).status_code == 202
            done = await wait_for_job(api, job_id)
            assert done["status"] == "indexed", (done, pipeline.logs())

        main = routing.exchange(namespace)
        refused = [
            # Parse hands a scan's page ranges to its own queue; no other stage may.
            ("chunk", main, routing.DOC_UPLOADED),
            ("chunk", main, routing.lane_key(routing.DOC_UPLOADED, routing.BULK)),
            ("parse", main, routing.DOC_EMBEDDED),
            ("parse", main, routing.job_event_key("index", "progress")),
            ("parse", main, routing.heartbeat_key("embed")),
            ("index", main, routing.DOC_UPLOADED),
            (GATEWAY, main, routing.job_event_key("parse", "progress")),
            (GATEWAY, main, routing.heartbeat_key("parse")),
            (GATEWAY, routing.dead_letter_exchange(namespace), routing.DOC_UPLOADED),
        ]
        for who, exchange, key in refused:
            with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
                await _publish(urls[who], exchange, key)
    finally:
        stop_pipeline(pipeline)
