"""Garbage published straight onto every stage queue by an independent AMQP client
(Debian's amqp-tools) is dead-lettered with a reason; good work keeps flowing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx
from documents import make_markdown
from invariants import assert_nothing_lost, dead_letters
from pipeline import Pipeline, wait_for_job

from contracts import routing
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES
from faults.conftest import PipelineFactory, upload

MALFORMED: dict[str, bytes] = {
    "invalid JSON": b'{"job_id": "half a',
    "unknown schema version": json.dumps({"version": 99, "payload": {}}).encode(),
    "missing fields": json.dumps({"version": 1, "filename": "x.pdf"}).encode(),
    "5 MB of garbage": os.urandom(5 * 1024 * 1024),
}


def amqp_publish(pipeline: Pipeline, queue: str, body: bytes) -> None:
    """Publish one persistent message straight onto a queue with amqp-publish."""
    # amqp-tools reads URIs strictly: a trailing "/" would name the empty vhost, not "/".
    url = pipeline.env["SLUICE_AMQP_URL"].rstrip("/")
    subprocess.run(
        [
            "amqp-publish",
            "--url",
            url,
            "-r",
            queue,
            "-p",
            "-C",
            "application/json",
        ],
        input=body,
        check=True,
        timeout=60,
        capture_output=True,
    )


async def test_malformed_messages_are_dead_lettered(pipelines: PipelineFactory) -> None:
    pipeline = pipelines()
    for stage in STAGES:
        for body in MALFORMED.values():
            amqp_publish(pipeline, routing.stage_queue(pipeline.namespace, stage), body)

    async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as api:
        good = await upload(api, "good.md", make_markdown("Good", {"A": "Still flowing."}))
        assert (await wait_for_job(api, good.json()["job_id"]))["status"] == "indexed"

        expected = len(STAGES) * len(MALFORMED)
        for _ in range(600):
            letters = await dead_letters(pipeline)
            if len(letters) >= expected:
                break
            await asyncio.sleep(0.1)
        assert len(letters) == expected
        assert {letter.stage for letter in letters} == set(STAGES)
        assert {letter.code for letter in letters} == {"invalid_message"}
        assert all(letter.reason.startswith(f"{letter.stage}: ") for letter in letters)
        await assert_nothing_lost(
            pipeline, api, [good.json()["job_id"]], unowned_dead_letters=expected
        )
