"""Idempotency-Keys through a real gateway app (SQLite job store, local blob store, the
in-memory broker double): a key is its API key's, in one collection; it comes back with the
same bytes or is refused; a deleted document frees it; and of concurrent uploads with one
key, one makes the job and the others get its answer, leaving no blob behind."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.services import Services
from stages.runtime.memory_broker import MemoryBroker

KEYS = "alice:red|shared,bob:blue|shared"


class Broker(MemoryBroker):
    """The broker double, with the connection state the gateway looks at."""

    is_connected = True
    publish_timeout_s = 5.0


@dataclass
class Gateway:
    """A started gateway app, a client that talks to it, and its services."""

    client: httpx.AsyncClient
    services: Services


async def started(tmp_path: Path, **settings: Any) -> AsyncIterator[Gateway]:
    """A started gateway app whose broker is the double."""
    # Its own broker would wait for RabbitMQ on port 1 for ever: the double stands in.
    config = Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/", **settings)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        services.broker = cast(Any, Broker(config))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield Gateway(client, services)


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with two tenants' keys: alice (red, shared) and bob (blue, shared)."""
    async for gateway in started(tmp_path, api_keys=KEYS):
        yield gateway.client


@pytest.fixture
async def open_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway without API keys (every caller is one)."""
    async for gateway in started(tmp_path):
        yield gateway


async def upload(
    client: httpx.AsyncClient,
    text: str,
    *,
    key: str | None = "k-1",
    caller: str | None = None,
    collection: str = "default",
) -> httpx.Response:
    """POST one text file, with an Idempotency-Key and a caller's API key if given."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    if caller:
        headers["Authorization"] = f"Bearer {caller}"
    return await client.post(
        "/v1/documents",
        files={"file": ("note.txt", text.encode())},
        data={"collection": collection},
        headers=headers,
    )


def blob_files(root: Path) -> list[Path]:
    """Every file in the blob store and the upload staging area (none is left in staging)."""
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file()) + sorted(
        p for p in (root / "staging").rglob("*") if p.is_file()
    )


async def test_one_tenants_key_is_never_anothers(keyed: httpx.AsyncClient) -> None:
    bobs = await upload(keyed, "Bob's confidential plan.", caller="bob", collection="blue")
    assert bobs.status_code == 202, bobs.text
    bob_job = bobs.json()["job_id"]

    # Alice sends Bob's key: her own upload, never Bob's job (nor its collection or name).
    alices = await upload(keyed, "Alice's notes.", caller="alice", collection="red")
    assert alices.status_code == 202, alices.text
    assert alices.json()["job_id"] != bob_job and alices.json()["collection"] == "red"
    assert alices.json()["duplicate"] is False
    seen = await keyed.get(f"/v1/jobs/{bob_job}", headers={"Authorization": "Bearer alice"})
    assert seen.status_code == 404

    # In a collection both may use, Bob's upload with a key Alice used first is his own new
    # job, not silently answered with hers; and his key answers him from then on.
    first = await upload(keyed, "Alice in shared.", key="k-2", caller="alice", collection="shared")
    then = await upload(keyed, "Bob in shared.", key="k-2", caller="bob", collection="shared")
    assert (first.status_code, then.status_code) == (202, 202), then.text
    assert then.json()["job_id"] != first.json()["job_id"]
    again = await upload(keyed, "Bob in shared.", key="k-2", caller="bob", collection="shared")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["job_id"] == then.json()["job_id"]
    listed = await keyed.get("/v1/jobs", headers={"Authorization": "Bearer bob"})
    collections = {j["job_id"]: j["collection"] for j in listed.json()["jobs"]}
    assert collections == {
        bob_job: "blue",
        then.json()["job_id"]: "shared",
        first.json()["job_id"]: "shared",
    }


async def test_a_key_back_with_other_bytes_is_refused(
    open_gateway: Gateway, tmp_path: Path
) -> None:
    key = "order-" + "x" * 94  # longer than a message shows
    first = await upload(open_gateway.client, "The first content.", key=key)
    assert first.status_code == 202, first.text
    same = await upload(open_gateway.client, "The first content.", key=key)
    assert same.status_code == 200 and same.json()["duplicate"] is True
    assert same.json()["job_id"] == first.json()["job_id"]

    other = await upload(open_gateway.client, "Other content, same key.", key=key)
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert key[:40] in error["message"] and key not in error["message"]
    assert "other content" in error["message"]
    jobs = (await open_gateway.client.get("/v1/jobs")).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [first.json()["job_id"]]
    assert len(blob_files(tmp_path)) == 1  # the refused upload's bytes were not kept

    too_long = await upload(open_gateway.client, "Anything.", key="k" * 256)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "invalid_idempotency_key"


async def test_a_deleted_documents_key_starts_afresh(open_gateway: Gateway) -> None:
    first = await upload(open_gateway.client, "Version one.")
    assert first.status_code == 202, first.text
    deleted = await open_gateway.client.delete(f"/v1/documents/{first.json()['document_id']}")
    assert deleted.status_code == 204
    fresh = await upload(open_gateway.client, "Something else entirely.")
    assert fresh.status_code == 202, fresh.text
    assert fresh.json()["job_id"] != first.json()["job_id"]


@pytest.mark.parametrize("bytes_", ["same", "other"])
async def test_thirty_uploads_with_one_key_at_once_make_one_job_and_one_blob(
    open_gateway: Gateway, tmp_path: Path, bytes_: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def text(i: int) -> str:
        return "One report, sent 30 times." if bytes_ == "same" else f"Report number {i}."

    # The worst order for the race: every upload's cheap look for a duplicate comes before
    # any job is recorded (so all store their bytes), and the store's `create` alone decides.
    monkeypatch.setattr(open_gateway.services.store, "find_duplicate", lambda *a, **k: None)
    answers = await asyncio.gather(*(upload(open_gateway.client, text(i)) for i in range(30)))

    statuses = Counter(a.status_code for a in answers)
    assert all(a.headers["content-type"] == "application/json" for a in answers)
    created = [a.json() for a in answers if a.status_code == 202]
    assert len(created) == 1, statuses
    winner = created[0]["job_id"]
    if bytes_ == "same":  # a client retrying: every loser gets the winner's answer
        assert statuses == {202: 1, 200: 29}, statuses
        assert {a.json()["job_id"] for a in answers} == {winner}
    else:  # the key came back with other bytes: refused, never another job
        assert statuses == {202: 1, 422: 29}, statuses
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 422} == {
            "idempotency_key_reused"
        }
    jobs = (await open_gateway.client.get("/v1/jobs")).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [winner]
    # The winner's bytes and nothing else: no loser left a blob or a staged file.
    assert [p.name for p in blob_files(tmp_path)] == [jobs[0]["blob_sha256"]]
