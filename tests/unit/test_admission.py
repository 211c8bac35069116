"""The admitter and a held upload's answer, on the in-memory broker double and a real SQLite
job store: held jobs go into their lane in the fair order, a publish that fails leaves the
job for the republisher, and a held job is answered 202 only while there is a broker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi import UploadFile

from contracts import routing
from contracts.messages import DocumentUploaded
from contracts.settings import Settings
from gateway.http.admission import Admitter
from gateway.http.errors import ApiError
from gateway.http.services import Services
from gateway.http.uploads import accept, valid_priority
from gateway.store.base import Admission, NewJob
from gateway.store.job_store import SqliteJobStore
from stages.backends.factory import open_blob_store
from stages.runtime.memory_broker import MemoryBroker

DEADLINE_S = 10.0


class Broker(MemoryBroker):
    """The broker double, with the connection state the gateway looks at."""

    is_connected = True
    publish_timeout_s = 5.0


@pytest.fixture
def services(tmp_path: Path) -> Services:
    """A gateway's services: lanes on, two bulk jobs in flight at most."""
    settings = Settings(data_dir=tmp_path, bulk_in_flight=2)
    store = SqliteJobStore(
        settings.job_db_path, admission=Admission.of(settings), queue_max_age_s=0
    )
    return Services(
        settings=settings,
        store=store,
        blobs=open_blob_store(settings),
        index=cast(Any, None),
        broker=cast(Any, Broker(settings)),
    )


def broker_of(services: Services) -> Broker:
    """The broker double behind the services."""
    return cast(Broker, services.broker)


def bulk(job_id: str, collection: str) -> NewJob:
    """A bulk job of its own bytes."""
    return NewJob(
        job_id,
        f"d-{job_id}",
        collection,
        "a.md",
        "text/markdown",
        1,
        hashlib.sha256(job_id.encode()).hexdigest(),
        priority="bulk",
    )


def parse_queue(services: Services, lane: routing.Lane) -> list[str]:
    """The job ids waiting in parse's queue of `lane`, oldest first."""
    name = routing.stage_queue(services.settings.namespace, "parse", lane)
    return [m.model(DocumentUploaded).job_id for m in broker_of(services).messages(name)]


async def test_held_jobs_go_into_the_bulk_lane_in_the_fair_order(services: Services) -> None:
    store = services.store
    for job in (bulk("a0", "big"), bulk("a1", "big"), bulk("c0", "small")):
        assert store.create(job) is None
    assert await Admitter(services).once() == 2
    assert parse_queue(services, "bulk") == ["a0", "c0"]
    assert parse_queue(services, "interactive") == []
    assert all(store.is_confirmed(j) for j in ("a0", "c0")) and not store.is_admitted("a1")
    published = broker_of(services).messages(
        routing.stage_queue(services.settings.namespace, "parse", "bulk")
    )
    assert published[0].model(DocumentUploaded).priority == "bulk"


async def test_a_refused_publish_leaves_the_job_to_the_republisher(services: Services) -> None:
    store = services.store
    assert store.create(bulk("a0", "big")) is None
    broker_of(services).refuse(routing.lane_key(routing.DOC_UPLOADED, "bulk"))
    assert await Admitter(services).once() == 1
    # Admitted (it keeps its slot and its turn), not confirmed, not forgotten.
    assert store.is_admitted("a0") and not store.is_confirmed("a0")
    assert not store.forget("a0")
    broker_of(services).is_connected = False
    assert await Admitter(services).once() == 0  # no broker: nothing is claimed


async def test_a_ring_wakes_the_admitter_at_once(services: Services) -> None:
    admitter = Admitter(services, every_s=3600)  # only a ring can wake it in time
    running = asyncio.create_task(admitter.run())
    try:
        await asyncio.sleep(0)  # let it start waiting
        assert services.store.create(bulk("a0", "big")) is None
        services.admissions.set()
        deadline = time.monotonic() + DEADLINE_S
        while not services.store.is_confirmed("a0"):
            assert time.monotonic() < deadline, "the ring did not wake the admitter"
            await asyncio.sleep(0.01)
    finally:
        running.cancel()


async def test_a_held_upload_is_answered_once_recorded_and_only_with_a_broker(
    services: Services,
) -> None:
    def file(text: str) -> UploadFile:
        return UploadFile(io.BytesIO(text.encode()), filename="note.md")

    status, answer = await accept(services, file("# One\n\nheld"), "c", None, priority="bulk")
    assert (status, answer.status) == (202, "queued")
    assert not services.store.is_admitted(answer.job_id)
    assert services.admissions.is_set()  # the admitter was told
    assert parse_queue(services, "bulk") == []  # not published: it waits for its turn

    broker_of(services).is_connected = False
    with pytest.raises(ApiError) as raised:
        await accept(services, file("# Two\n\nrefused"), "c", None, priority="bulk")
    assert (raised.value.status, raised.value.code) == (503, "broker_unavailable")
    jobs, _ = services.store.page(None, "c", 10, None)
    assert [j.job_id for j in jobs] == [answer.job_id]  # the refused one left no job


def test_a_priority_is_a_lane_or_a_400() -> None:
    assert valid_priority("bulk") == "bulk" and valid_priority("interactive") == "interactive"
    with pytest.raises(ApiError) as raised:
        valid_priority("urgent")
    assert (raised.value.status, raised.value.code) == (400, "invalid_priority")
