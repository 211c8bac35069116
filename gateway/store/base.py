"""The job store's seam: what every job store offers, and the one factory that opens one."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from contracts.errors import SluiceError
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
    # A new version of an existing document (PUT): it duplicates only that document's
    # current bytes, not the same bytes in another document of the collection.
    replaces: bool = False


@dataclass(frozen=True)
class JobBlobs:
    """The blobs a job wrote."""

    blob_sha256: str
    parsed_sha256: str | None


class JobStore(Protocol):
    """Jobs and documents; one implementation per backend (SQLite, PostgreSQL), both held to
    the same contract tests (tests/unit/test_job_store_contract.py).

    Accepting an upload is crash-safe by design: `create` records the job *unconfirmed*;
    once the broker confirmed its `doc.uploaded`, `confirm` marks it. A job recorded but never
    confirmed (its gateway died in between) is claimed by one gateway at a time with
    `claim_unconfirmed` (a lease) and published again. Several gateways may share one store:
    every method is safe to call from any of them at once.
    """

    def create(self, job: NewJob) -> Job | None:
        """Record an unconfirmed job and make it its document's current version, unless a
        duplicate exists (same Idempotency-Key, or same bytes in a live document of the
        collection; for a new version, the document's current job with the same bytes):
        then nothing is written and the duplicate is returned. Check and write are atomic,
        so of concurrent uploads of the same thing exactly one creates a job."""
        ...

    def confirm(self, job_id: str) -> None:
        """The broker confirmed the job's first message: it is in the pipeline. (Folding any
        stage's event for the job confirms it too: the broker evidently had it.)"""
        ...

    def is_confirmed(self, job_id: str) -> bool:
        """Whether the job's first message was confirmed (False for an unknown job)."""
        ...

    def claim_unconfirmed(self, older_than_s: float, lease_s: float, limit: int) -> list[Job]:
        """Jobs recorded more than `older_than_s` ago and never confirmed, whose lease (if
        any) has run out, oldest first; each comes back leased for `lease_s`, so no other
        caller gets it meanwhile. The caller publishes each again and confirms it. Only a
        document's current version is claimed: a deleted or replaced one is not worth
        publishing (it would bring a deleted document back into the index)."""
        ...

    def forget(self, job_id: str) -> bool:
        """Remove a job the broker refused, and its document if it had no other job (else the
        version before it is current again); only while it is unconfirmed and was never
        claimed (a claimed one may be in flight). Returns whether it was removed."""
        ...

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
    """The job store `SLUICE_JOB_STORE_URL` chooses: `postgresql://…` for PostgreSQL, else
    SQLite under the data directory."""
    url = settings.job_store_url
    if url and url.startswith(("postgresql://", "postgres://")):
        from gateway.store.pg_job_store import PgJobStore

        return PgJobStore(url, pipeline=settings.pipeline, stalled_after_s=settings.stalled_after_s)
    if url:
        raise SluiceError(
            "SLUICE_JOB_STORE_URL must be a postgresql:// URL, or unset for SQLite",
            code="usage_error",
        )
    from gateway.store.job_store import SqliteJobStore

    return SqliteJobStore(
        settings.job_db_path,
        pipeline=settings.pipeline,
        stalled_after_s=settings.stalled_after_s,
    )
