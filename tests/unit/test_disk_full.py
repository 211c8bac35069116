"""A full disk, for real: each test mounts a tmpfs of a few MiB, fills it to the last byte,
and checks that the store on it says `storage_full` (a `Transient`), leaves nothing
half-written, and works again once the filler is deleted."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from s3 import S3StandIn
from small_disk import SmallDisk, small_disk

from contracts import routing
from contracts.errors import StorageFull, Transient
from contracts.events import JobEvent
from contracts.message_signature import SIGNATURE_HEADER, MessageSigner
from contracts.messages import Chunk, EmbeddedBatch, PackedVectors
from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.services import JobChanges
from gateway.store import tracker as tracker_module
from gateway.store.base import JobStore, NewJob
from gateway.store.job_store import SqliteJobStore
from gateway.store.tracker import Tracker
from stages.backends.blobs import LocalBlobStore
from stages.backends.lance_index import LanceIndex
from stages.backends.s3_blobs import S3BlobStore

# Bigger than anything a filled disk has left, smaller than the disk.
BLOB = os.urandom(512 * 1024)
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs of the test's own."""
    with small_disk(tmp_path / "small") as mounted:
        yield mounted


def files_under(path: Path) -> list[str]:
    """Every file under `path` but the filler, by path relative to it."""
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "filler"
    )


def test_put_bytes_on_a_full_disk_is_storage_full_and_leaves_no_partial_blob(
    disk: SmallDisk,
) -> None:
    store = LocalBlobStore(disk.path / "blobs")
    disk.fill()
    with pytest.raises(StorageFull) as raised:
        store.put_bytes(BLOB)
    assert isinstance(raised.value, Transient) and raised.value.code == "storage_full"
    assert "no space left" in raised.value.message and SHA in raised.value.message
    assert not store.exists(SHA)
    assert files_under(disk.path) == []

    disk.free()
    assert store.put_bytes(BLOB) == SHA
    assert store.read_bytes(SHA) == BLOB
    assert files_under(disk.path) == [f"blobs/{SHA[:2]}/{SHA}"]


def test_adopt_from_another_disk_onto_a_full_one_keeps_the_staged_file(
    disk: SmallDisk, tmp_path: Path
) -> None:
    store = LocalBlobStore(disk.path / "blobs")
    staged = tmp_path / "upload.part"
    staged.write_bytes(BLOB)
    disk.fill()
    with pytest.raises(StorageFull):
        store.adopt(staged, SHA)
    # The copy the full disk cut short is gone; the caller still has its file to retry with.
    assert not store.exists(SHA)
    assert files_under(disk.path) == []
    assert staged.read_bytes() == BLOB

    disk.free()
    store.adopt(staged, SHA)
    assert store.read_bytes(SHA) == BLOB
    assert not staged.exists()


def test_a_copy_of_an_s3_blob_on_a_full_cache_disk_is_storage_full(
    disk: SmallDisk, s3: S3StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    store = S3BlobStore.from_url(f"s3://{s3.bucket()}/disk-full", cache_dir=disk.path / "cache")
    assert store.put_bytes(BLOB) == SHA
    disk.fill()
    with pytest.raises(StorageFull) as raised, store.as_file(SHA):
        pass
    assert "blob cache" in raised.value.message
    assert files_under(disk.path) == []

    disk.free()
    with store.as_file(SHA) as copy:
        assert copy.read_bytes() == BLOB


def hex_id() -> str:
    return uuid.uuid4().hex


def embedded_batch(document_id: str, chunks: int, collection: str = "default") -> EmbeddedBatch:
    """One whole document in one batch, with chunks big enough to need a few pages."""
    return EmbeddedBatch(
        job_id=hex_id(),
        document_id=document_id,
        collection=collection,
        filename="terns.pdf",
        batch_index=0,
        batch_count=1,
        chunks_total=chunks,
        chunks=[
            Chunk(
                chunk_id=f"{document_id}-{n}",
                chunk_index=n,
                text=f"Arctic terns migrate from pole to pole, chunk {n}. " * 40,
            )
            for n in range(chunks)
        ],
        vectors=PackedVectors.pack([[1.0, 0.0, 0.0, 0.0]] * chunks, 4),
    )


def test_an_index_write_on_a_full_disk_is_storage_full_and_the_retry_writes_once(
    disk: SmallDisk,
) -> None:
    index = LanceIndex(disk.path / "index")
    before = embedded_batch(hex_id(), 2)
    index.upsert("default", [before])
    disk.fill()
    after = embedded_batch(hex_id(), 40)
    with pytest.raises(StorageFull) as raised:
        index.upsert("default", [after])
    assert raised.value.code == "storage_full"
    assert "collection 'default'" in raised.value.message
    # What was there is still there, and nothing of the write that failed.
    assert len(index.chunk_ids("default", before.document_id)) == 2
    assert index.chunk_ids("default", after.document_id) == []
    with pytest.raises(StorageFull):
        index.delete_document("default", before.document_id)

    disk.free()
    index.upsert("default", [after])
    reopened = LanceIndex(disk.path / "index")
    assert sorted(reopened.chunk_ids("default", after.document_id)) == sorted(
        c.chunk_id for c in after.chunks
    )
    assert reopened.batches_done("default", after.document_id, after.job_id) == 1
    index.delete_document("default", before.document_id)
    assert reopened.chunk_ids("default", before.document_id) == []


def test_a_collection_first_written_on_a_full_disk_is_created_once_space_returns(
    disk: SmallDisk,
) -> None:
    # LanceDB makes the table's directory before it fails to write the table's first
    # version: a directory it lists but cannot open, until a create succeeds.
    index = LanceIndex(disk.path / "index")
    disk.fill()
    first = embedded_batch(hex_id(), 3, collection="terns")
    for _ in range(2):
        with pytest.raises(StorageFull):
            index.upsert("terns", [first])
    fresh = LanceIndex(disk.path / "index")
    assert fresh.search("terns", [1.0, 0.0, 0.0, 0.0], k=5) == []
    assert fresh.chunk_ids("terns", first.document_id) == []

    disk.free()
    index.upsert("terns", [first])
    assert len(fresh.chunk_ids("terns", first.document_id)) == 3
    assert len(LanceIndex(disk.path / "index").search("terns", [1.0, 0.0, 0.0, 0.0], k=5)) == 3


def new_job() -> NewJob:
    """A job of bytes of its own (the same bytes would be a duplicate, which writes nothing)."""
    return NewJob(hex_id(), hex_id(), "default", "a.pdf", "application/pdf", 1, hex_id() * 2)


def store_on(disk: SmallDisk) -> SqliteJobStore:
    """A job store on `disk` with one job, its write-ahead log emptied: SQLite reuses a
    log's pages without asking the disk, so only an empty one needs new space at once."""
    path = disk.path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    assert store.create(new_job()) is None
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store


def test_a_full_disk_fails_a_job_store_write_with_storage_full_and_keeps_the_store(
    disk: SmallDisk,
) -> None:
    store = store_on(disk)
    job = new_job()
    disk.fill()
    try:
        with pytest.raises(StorageFull) as raised:
            store.create(job)
        assert "jobs.sqlite3 has no space left" in raised.value.message
        assert store.get(job.job_id) is None
        disk.free()
        # The store is not left inside a transaction: it writes again at once.
        assert store.create(job) is None
        assert store.get(job.job_id) is not None
    finally:
        store.close()


class Delivery:
    """A tracker delivery double: a signed event, and whether it was acked."""

    def __init__(self, event: JobEvent, signer: MessageSigner) -> None:
        self.body = event.model_dump_json().encode()
        self.routing_key = routing.job_event_key(event.stage, event.kind)
        self.headers = {SIGNATURE_HEADER: signer.sign(self.routing_key, self.body)}
        self.acked = asyncio.Event()

    async def ack(self) -> None:
        """The tracker settled it."""
        self.acked.set()


class Counting:
    """A job store that counts the folds that failed, and says when `enough` did."""

    def __init__(self, inner: SqliteJobStore, enough: int) -> None:
        self.inner = inner
        self.failed = 0
        self.enough = enough
        # Folds run in a worker thread.
        self.failed_enough = threading.Event()

    def apply_all(self, events: list[JobEvent]) -> set[str]:
        """Fold, counting a failure."""
        try:
            return self.inner.apply_all(events)
        except BaseException:
            self.failed += 1
            if self.failed >= self.enough:
                self.failed_enough.set()
            raise


async def test_the_tracker_keeps_events_unacked_on_a_full_disk_and_folds_them_after(
    disk: SmallDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", (0.01,))
    store = store_on(disk)
    job = new_job()
    assert store.create(job) is None
    with sqlite3.connect(disk.path / "jobs.sqlite3") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # Without SQLITE_FULL as a `Transient`, the fold fails once and its events are never
    # folded nor acked again (until a reconnect hands them out anew).
    counting = Counting(store, enough=3)
    signer = MessageSigner("test-secret")
    broker = SimpleNamespace(signer=signer, settings=Settings())
    tracker = Tracker(cast(Any, broker), cast(JobStore, counting), JobChanges())
    folder = asyncio.create_task(tracker._fold_forever())
    disk.fill()
    try:
        started = JobEvent(
            job_id=job.job_id, document_id=job.document_id, stage="parse", kind="started"
        )
        delivery = Delivery(started, signer)
        await tracker._on_event(cast(Any, delivery))
        assert await asyncio.to_thread(counting.failed_enough.wait, 30)
        assert not delivery.acked.is_set()
        disk.free()
        async with asyncio.timeout(30):
            await delivery.acked.wait()
        recorded = store.get(job.job_id)
        assert recorded is not None and recorded.status == "parsing"
    finally:
        folder.cancel()
        store.close()


def gateway(data_dir: Path) -> TestClient:
    """A gateway on `data_dir`; no broker answers on port 1, so what passes every check
    before the publish is answered 503 `broker_unavailable`."""
    settings = Settings(data_dir=data_dir, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


def post(client: TestClient) -> Any:
    return client.post("/v1/documents", files={"file": ("terns.txt", b"Terns. " * 60_000)})


def assert_storage_full(answer: Any) -> None:
    assert answer.status_code == 507, answer.text
    assert answer.headers["Retry-After"] == "30"
    assert answer.json() == {
        "error": {
            "code": "storage_full",
            "message": "The gateway's storage is full, so nothing was stored; try again later.",
        }
    }


def test_an_upload_to_a_full_data_disk_is_507_and_leaves_nothing_behind(
    disk: SmallDisk,
) -> None:
    with gateway(disk.path) as client:
        before = files_under(disk.path)
        disk.fill()
        assert_storage_full(post(client))
        # The staged part of the upload is gone, and nothing was recorded.
        assert files_under(disk.path) == before
        assert client.get("/v1/jobs").json()["jobs"] == []

        disk.free()
        answer = post(client)
        assert answer.json()["error"]["code"] == "broker_unavailable", answer.text


def test_an_upload_whose_job_store_disk_is_full_is_507(disk: SmallDisk, tmp_path: Path) -> None:
    # Only the job store (and the index) on the small disk: staging and blobs elsewhere.
    for name in ("staging", "blobs"):
        (tmp_path / name).mkdir()
        (disk.path / name).symlink_to(tmp_path / name)
    with gateway(disk.path) as client:
        with sqlite3.connect(disk.path / "jobs.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        disk.fill()
        assert_storage_full(post(client))
        assert list((tmp_path / "staging").iterdir()) == []
        disk.free()
        answer = post(client)
        assert answer.json()["error"]["code"] == "broker_unavailable", answer.text
