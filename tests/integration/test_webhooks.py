"""Webhooks end to end: the real pipeline (real broker, real model) with the webhook side
stage, POSTing finished jobs to a receiver on loopback that checks every signature.

Loopback receivers are refused by default, so this pipeline runs with
SLUICE_WEBHOOK_ALLOW_PRIVATE; retries wait one second (SLUICE_WEBHOOK_RETRY_DELAYS_S=[1]) and
are never absorbed in-process (SLUICE_WEBHOOK_TRANSIENT_RETRIES=0), so every POST the
receiver sees is one attempt the job's `webhook` counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_corrupt_pdf, make_markdown
from fakes.webhook_receiver import FakeWebhookReceiver, ReceivedWebhook
from pipeline import Pipeline, launch, queue_consumers, sluice_command, stop_pipeline, wait_for_job

from contracts import routing
from contracts.webhook_signature import verify

SETTINGS = {
    "SLUICE_WEBHOOK_ALLOW_PRIVATE": "true",
    "SLUICE_WEBHOOK_RETRY_DELAYS_S": "[1]",
    "SLUICE_WEBHOOK_MAX_ATTEMPTS": "5",
    "SLUICE_WEBHOOK_TRANSIENT_RETRIES": "0",
    "SLUICE_WEBHOOK_METRICS_PORT": "0",
    "SLUICE_WEBHOOK_TIMEOUT_S": "5",
}


def _wait_for_webhook_stage(pipeline: Pipeline, broker: BrokerHandle) -> str:
    """Wait (with a deadline) until the webhook stage consumes; returns the secret it made."""
    secret_file = pipeline.data_dir / "webhook.secret"
    queue = routing.stage_queue(pipeline.namespace, "webhook")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        process = pipeline.processes["webhook"]
        if process.poll() is not None:
            raise RuntimeError(f"the webhook stage exited\n{pipeline.logs()}")
        if secret_file.exists() and queue_consumers(broker, queue) >= 1:
            return secret_file.read_text().strip()
        time.sleep(0.25)
    raise RuntimeError(f"the webhook stage did not start consuming\n{pipeline.logs()}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[FakeWebhookReceiver]:
    """The receiving end; its secret is set once the webhook stage has made one."""
    with FakeWebhookReceiver(secret="") as running:
        yield running


@pytest.fixture(scope="module")
def webhook_pipeline(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory, receiver: FakeWebhookReceiver
) -> Iterator[Pipeline]:
    """A real Sluice with the webhook stage, as `sluice up` runs it; no SLUICE_WEBHOOK_SECRET,
    so the stage makes one in the data dir, which the receiver then verifies with."""
    running = launch(
        broker,
        tmp_path_factory.mktemp("webhooks"),
        SETTINGS,
        commands={"webhook": [*sluice_command(), "stage", "webhook"]},
    )
    try:
        receiver.secret = _wait_for_webhook_stage(running, broker)
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(webhook_pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the pipeline's gateway."""
    async with httpx.AsyncClient(base_url=webhook_pipeline.url, timeout=30) as client:
        yield client


async def _upload(api: httpx.AsyncClient, name: str, data: bytes, callback_url: str) -> str:
    answer = await api.post(
        "/v1/documents",
        files={"file": (name, data)},
        data={"collection": "hooks", "callback_url": callback_url},
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


async def _webhook_settles(
    api: httpx.AsyncClient, job_id: str, deadline_s: float = 120.0
) -> dict[str, Any]:
    """The job once its webhook is delivered or failed for good (polled, with a deadline)."""
    deadline = time.monotonic() + deadline_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        if (job.get("webhook") or {}).get("status") in ("delivered", "failed"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"the webhook of job {job_id} did not settle: {job}")


def _note(title: str, text: str) -> bytes:
    return make_markdown(title, {"Note": text})


def _signed_for(received: ReceivedWebhook, secret: str, job_id: str) -> None:
    assert received.signature_ok, received.headers
    assert verify(secret, received.body, received.headers["x-sluice-signature"])
    assert received.headers["content-type"] == "application/json"
    assert received.job_id == job_id == received.job["job_id"]
    assert received.delivery_id == f"{job_id}.1"


async def test_every_finished_job_is_posted_once_signed(
    api: httpx.AsyncClient, receiver: FakeWebhookReceiver
) -> None:
    indexed_id = await _upload(
        api,
        "herons.md",
        _note("Herons", "Grey herons stand still in the shallows for an hour."),
        receiver.url("/hooks/indexed"),
    )
    failed_id = await _upload(api, "broken.pdf", make_corrupt_pdf(), receiver.url("/hooks/failed"))

    indexed, failed = await asyncio.gather(
        wait_for_job(api, indexed_id), wait_for_job(api, failed_id)
    )
    assert (indexed["status"], failed["status"]) == ("indexed", "failed")

    for job_id, path, status in (
        (indexed_id, "/hooks/indexed", "indexed"),
        (failed_id, "/hooks/failed", "failed"),
    ):
        await asyncio.to_thread(receiver.wait_for, path, 1)
        job = await _webhook_settles(api, job_id)
        assert job["webhook"]["status"] == "delivered", job["webhook"]
        assert job["webhook"]["attempts"] == 1, job["webhook"]
        # The job stays what it was: a webhook is no step of the job.
        assert job["status"] == status
        (received,) = receiver.at(path)
        _signed_for(received, receiver.secret, job_id)
        # The body is the job JSON as GET /v1/jobs/{id} answered when it ended.
        assert received.job["status"] == status
        assert received.job["collection"] == "hooks"
        # A callback URL may hold a token: it is never shown in the job.
        assert path not in received.body.decode()
    (failed_post,) = receiver.at("/hooks/failed")
    assert failed_post.job["error"]["stage"] == "parse"


async def test_a_receiver_that_fails_twice_is_retried_until_it_answers(
    api: httpx.AsyncClient, receiver: FakeWebhookReceiver
) -> None:
    receiver.script("/hooks/flaky", [500, 500])
    job_id = await _upload(
        api,
        "terns.md",
        _note("Terns", "Arctic terns fly from pole to pole every single year."),
        receiver.url("/hooks/flaky"),
    )

    posts = await asyncio.to_thread(receiver.wait_for, "/hooks/flaky", 3)
    job = await _webhook_settles(api, job_id)

    assert [p.answered for p in posts] == [500, 500, 200]
    # One delivery, tried three times: the same id, the same signed bytes.
    assert {p.delivery_id for p in posts} == {f"{job_id}.1"}
    assert len({p.body for p in posts}) == 1
    for post in posts:
        _signed_for(post, receiver.secret, job_id)
    webhook = job["webhook"]
    assert (webhook["status"], webhook["attempts"]) == ("delivered", 3), webhook
    assert "answered 500" in webhook["last_error"], webhook
    assert job["status"] == "indexed"


async def test_a_receiver_that_refuses_fails_the_webhook_not_the_job(
    api: httpx.AsyncClient, receiver: FakeWebhookReceiver
) -> None:
    receiver.script("/hooks/gone", [410])
    job_id = await _upload(
        api,
        "plovers.md",
        _note("Plovers", "Ringed plovers feign a broken wing to lead foxes away."),
        receiver.url("/hooks/gone"),
    )

    job = await _webhook_settles(api, job_id)

    webhook = job["webhook"]
    assert (webhook["status"], webhook["attempts"]) == ("failed", 1), webhook
    assert "answered 410" in webhook["last_error"], webhook
    assert job["status"] == "indexed" and job["error"] is None, job
    assert [p.answered for p in receiver.at("/hooks/gone")] == [410]


def test_the_receiver_double_can_tell_a_forged_signature() -> None:
    """The double's check is the real one: a body signed with another secret fails it."""
    from contracts.webhook_signature import sign

    with FakeWebhookReceiver(secret="right") as fake:
        body = b'{"job_id":"x"}'
        fake.take("/p", body, {"x-sluice-signature": sign("wrong", body)})
        fake.take("/p", body, {"x-sluice-signature": sign("right", body)})
        assert [r.signature_ok for r in fake.at("/p")] == [False, True]


async def test_a_new_version_names_its_own_callback(
    api: httpx.AsyncClient, receiver: FakeWebhookReceiver
) -> None:
    first = await _upload(
        api,
        "cranes.md",
        _note("Cranes", "Common cranes dance in pairs on the spring marshes."),
        receiver.url("/hooks/v1"),
    )
    document_id = (await wait_for_job(api, first))["document_id"]
    answer = await api.put(
        f"/v1/documents/{document_id}",
        files={"file": ("cranes.md", _note("Cranes", "Cranes also dance in the autumn."))},
        data={"callback_url": receiver.url("/hooks/v2")},
    )
    assert answer.status_code == 202, answer.text
    second = answer.json()["job_id"]

    (post,) = await asyncio.to_thread(receiver.wait_for, "/hooks/v2", 1)

    assert post.job_id == second != first
    assert post.job["document_id"] == document_id and post.signature_ok
    assert (await _webhook_settles(api, second))["webhook"]["status"] == "delivered"
