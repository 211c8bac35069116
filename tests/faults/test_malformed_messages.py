"""Garbage published straight onto every stage queue by an independent AMQP client
(Debian's amqp-tools) is dead-lettered with a reason; good work keeps flowing. Unsigned, it is
not even read (`unauthenticated_message`); signed with the deployment's secret, as a Sluice
process with a bug would send it, it is read and refused (`invalid_message`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections import Counter

import httpx
from documents import make_markdown
from invariants import assert_nothing_lost, dead_letters
from pipeline import Pipeline, wait_for_job

from contracts import routing
from contracts.message_signature import SIGNATURE_HEADER, UNAUTHENTICATED
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from faults.conftest import PipelineFactory, upload
from stages.infra.signing import signer_of

MALFORMED: dict[str, bytes] = {
    "invalid JSON": b'{"job_id": "half a',
    "unknown schema version": json.dumps({"version": 99, "payload": {}}).encode(),
    "missing fields": json.dumps({"version": 1, "filename": "x.pdf"}).encode(),
    "5 MB of garbage": os.urandom(5 * 1024 * 1024),
}


def amqp_publish(
    pipeline: Pipeline,
    body: bytes,
    *,
    queue: str | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    signature: str | None = None,
) -> None:
    """Publish one persistent message with amqp-publish: straight onto `queue` (the default
    exchange), or to `exchange` with `routing_key`; with `signature` as its signature header."""
    # amqp-tools reads URIs strictly: a trailing "/" would name the empty vhost, not "/".
    url = pipeline.env["SLUICE_AMQP_URL"].rstrip("/")
    where = ["-r", queue] if queue else ["-e", exchange or "", "-r", routing_key or ""]
    headers = ["-H", f"{SIGNATURE_HEADER}: {signature}"] if signature else []
    subprocess.run(
        ["amqp-publish", "--url", url, *where, "-p", "-C", "application/json", *headers],
        input=body,
        check=True,
        timeout=60,
        capture_output=True,
    )


async def test_malformed_messages_are_dead_lettered(pipelines: PipelineFactory) -> None:
    pipeline = pipelines()
    settings = pipeline.settings()
    # The secret every process of this pipeline shares: made once in its data directory.
    signer = signer_of(settings)
    for stage in STAGES:
        queue = routing.stage_queue(pipeline.namespace, stage)
        topic = settings.pipeline.spec(stage).input_key
        for body in MALFORMED.values():
            amqp_publish(pipeline, body, queue=queue, signature=signer.sign(topic, body))
            amqp_publish(pipeline, body, queue=queue)

    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        good = await upload(api, "good.md", make_markdown("Good", {"A": "Still flowing."}))
        assert (await wait_for_job(api, good.json()["job_id"]))["status"] == "indexed"

        each = len(STAGES) * len(MALFORMED)
        for _ in range(600):
            letters = await dead_letters(pipeline)
            if len(letters) >= 2 * each:
                break
            await asyncio.sleep(0.1)
        assert len(letters) == 2 * each
        assert {letter.stage for letter in letters} == set(STAGES)
        assert Counter(letter.code for letter in letters) == {
            "invalid_message": each,
            UNAUTHENTICATED: each,
        }
        assert all(letter.reason.startswith(f"{letter.stage}: ") for letter in letters)
        await assert_nothing_lost(
            pipeline, api, [good.json()["job_id"]], unowned_dead_letters=2 * each
        )
