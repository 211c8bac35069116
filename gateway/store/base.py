"""The job store's seam: what every job store offers, and the one factory that opens one."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from contracts.events import JobEvent
from contracts.settings import Settings
from gateway.http.schemas import Job


@dataclass(frozen=True)
class NewJob:
    """A job about to be queued."""

    job_id: str
    document_id: str
    collection: str
    filename: str
    content_type: str
    size_bytes: int
    blob_sha256: str
    idempotency_key: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class JobBlobs:
    """The blobs a job wrote."""

    blob_sha256: str
    parsed_sha256: str | None


class JobStore(Protocol):
    """Jobs and documents; one real implementation per backend."""

    def create(self, job: NewJob) -> None: ...
    def forget(self, job_id: str) -> None: ...
    def get(self, job_id: str) -> Job | None: ...
    def page(
        self,
        status: str | None,
        collection: str | None,
        limit: int,
        cursor: str | None,
        *,
        collections: frozenset[str] | None = None,
        stalled: bool | None = None,
    ) -> tuple[list[Job], str | None]: ...
    def collections_of(self, job_ids: Collection[str]) -> dict[str, str]: ...
    def find_duplicate(
        self, collection: str, blob_sha256: str, idempotency_key: str | None
    ) -> Job | None: ...
    def document_collection(self, document_id: str) -> str | None: ...
    def current_job(self, document_id: str) -> Job | None: ...
    def delete_document(self, document_id: str) -> list[JobBlobs]: ...
    def blob_in_use(self, sha256: str) -> bool: ...
    def apply(self, event: JobEvent) -> bool: ...
    def apply_all(self, events: Sequence[JobEvent]) -> set[str]: ...
    def reopen(self, job_id: str) -> Job | None: ...
    def ping(self) -> None: ...
    def count_by_status(self) -> dict[str, int]: ...


def open_job_store(settings: Settings) -> JobStore:
    """The job store the settings choose (today: SQLite under the data directory)."""
    from gateway.store.job_store import SqliteJobStore

    return SqliteJobStore(
        settings.job_db_path,
        pipeline=settings.pipeline,
        stalled_after_s=settings.stalled_after_s,
    )
