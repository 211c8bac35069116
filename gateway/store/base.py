"""The job store's seam: what every job store offers, and the one factory that opens one."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from contracts.errors import SluiceError
from contracts.events import JobEvent
from contracts.messages import IndexProfile
from contracts.routing import INTERACTIVE, Lane
from contracts.settings import Settings
from gateway.http.schemas import Job
from gateway.store.reindex_base import Reindex, ReindexStore

# Whose Idempotency-Keys a key is among (a job's `key_owner`): a fingerprint of the caller's
# API key, or OPEN_KEY_OWNER on a gateway without keys, where every caller is one. Keys
# recorded before keys had owners are LEGACY_KEY_OWNER's: they answer, in their collection,
# to any caller who may use it (who may see that collection's jobs anyway).
OPEN_KEY_OWNER = "open"
LEGACY_KEY_OWNER = "*"


class DocumentGone(SluiceError):
    """A new version of a document that was deleted while it was uploaded: it is refused,
    or it would bring the document back (as a record whose work the index drops)."""

    code = "document_not_found"

    def __init__(self, document_id: str) -> None:
        super().__init__(f"No document {document_id}: it was deleted.")


class IdempotencyKeyReused(SluiceError):
    """An Idempotency-Key came back with other bytes than its first upload had: the upload is
    refused (422), not answered with the first upload's job, nor made a second job."""

    code = "idempotency_key_reused"

    def __init__(self, key: str, first_job_id: str) -> None:
        super().__init__(
            f"The Idempotency-Key {key[:40]!r} was first used for an upload with other content "
            f"(job {first_job_id}). Send a new key with new content, or the same content again "
            "with this key."
        )
        self.key = key
        self.first_job_id = first_job_id


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
    # The lane the job's work travels in; bulk work waits in the store to be admitted.
    priority: Lane = INTERACTIVE
    # Where the job JSON is POSTed when the job ends (may hold a token: never shown).
    callback_url: str | None = None
    # Whose key `idempotency_key` is: keys are unique per owner and collection.
    key_owner: str = OPEN_KEY_OWNER


@dataclass(frozen=True)
class Admission:
    """When a store holds a new job instead of admitting it at once, and how many of each
    lane may be in the pipeline (admitted, not ended) before the rest wait.

    With `lanes` off nothing is held: every job is admitted when it is recorded (one FIFO).
    """

    lanes: bool = True
    # Bulk jobs in flight, every collection together (SLUICE_BULK_IN_FLIGHT).
    bulk_in_flight: int = Settings.model_fields["bulk_in_flight"].default
    # Interactive jobs in flight per collection (SLUICE_INTERACTIVE_IN_FLIGHT_PER_COLLECTION).
    interactive_per_collection: int = Settings.model_fields[
        "interactive_in_flight_per_collection"
    ].default

    @classmethod
    def of(cls, settings: Settings) -> Admission:
        """The admission policy the settings describe."""
        return cls(
            lanes=settings.lanes,
            bulk_in_flight=settings.bulk_in_flight,
            interactive_per_collection=settings.interactive_in_flight_per_collection,
        )


@dataclass(frozen=True)
class CollectionCounts:
    """One collection as the job store knows it: its documents (in any state), the chunks
    indexed for them in its serving generation, that generation and how it was built, and
    its newest reindex (the one under way, if any)."""

    collection: str
    documents: int
    chunks: int
    generation: int = 0
    profile: IndexProfile | None = None
    reindex: Reindex | None = None


@dataclass(frozen=True)
class JobBlobs:
    """The blobs a job wrote (and its id: its notes in the blob store are named after it)."""

    blob_sha256: str
    parsed_sha256: str | None
    job_id: str = ""


class JobStore(ReindexStore, Protocol):
    """Jobs and documents; one implementation per backend (SQLite, PostgreSQL), both held to
    the same contract tests (tests/unit/test_job_store_contract.py).

    Accepting an upload is crash-safe by design: `create` records the job *unconfirmed*;
    once the broker confirmed its `doc.uploaded`, `confirm` marks it. A job recorded but never
    confirmed (its gateway died in between) is claimed by one gateway at a time with
    `claim_unconfirmed` (a lease) and published again. Several gateways may share one store:
    every method is safe to call from any of them at once.

    Lanes and fair share: a job is recorded *admitted* (in the pipeline, published at once)
    or *held* (waiting in the store), as the store's `Admission` policy says; held jobs are
    admitted a few at a time, fairly between collections, by `claim_admissions`
    (gateway/store/fair_share.py has the rule). A job that ends with a callback URL has its
    webhook due; `claim_webhooks` hands it to one gateway at a time to publish.
    """

    def create(self, job: NewJob) -> Job | None:
        """Record an unconfirmed job and make it its document's current version, unless a
        duplicate exists (the same Idempotency-Key of the same owner in the collection, or the
        same bytes in a live document of the collection; for a new version, the document's
        current job with the same bytes): then nothing is written and the duplicate is
        returned. A key whose job had other bytes raises `IdempotencyKeyReused`. Check and
        write are atomic, so of concurrent uploads of the same thing exactly one creates a
        job and the others get its job (or the raise); no other error comes of the race.
        A deleted document's keys are free again. A new version of a document deleted
        meanwhile raises `DocumentGone`. The job is admitted at once, or held (bulk
        work; interactive work of a collection at its cap): `is_admitted` says which."""
        ...

    def is_admitted(self, job_id: str) -> bool:
        """Whether the job was let into the pipeline (False while it is held, or unknown)."""
        ...

    def claim_admissions(self, lease_s: float, limit: int) -> list[Job]:
        """Admit up to `limit` held jobs, as many as the lanes have room for, chosen fairly
        between collections (gateway/store/fair_share.py), in the order admitted; atomic
        across gateways. Each comes back leased for `lease_s`: the caller publishes it and
        confirms it, and if it dies first `claim_unconfirmed` has it once the lease ran out."""
        ...

    def confirm(self, job_id: str) -> None:
        """The broker confirmed the job's first message: it is in the pipeline. (Folding any
        stage's event for the job confirms it too: the broker evidently had it.)"""
        ...

    def is_confirmed(self, job_id: str) -> bool:
        """Whether the job's first message was confirmed (False for an unknown job)."""
        ...

    def claim_unconfirmed(self, older_than_s: float, lease_s: float, limit: int) -> list[Job]:
        """Jobs admitted more than `older_than_s` ago and never confirmed, whose lease (if
        any) has run out, oldest first; each comes back leased for `lease_s`, so no other
        caller gets it meanwhile. The caller publishes each again and confirms it. Only a
        document's current version is claimed: a deleted or replaced one is not worth
        publishing (it would bring a deleted document back into the index). A held job is
        never claimed: it waits for `claim_admissions`."""
        ...

    def forget(self, job_id: str) -> bool:
        """Remove a job the broker refused, and its document if it had no other job (else the
        version before it is current again); only while it is unconfirmed and was never
        claimed (a claimed one may be in flight). Returns whether it was removed."""
        ...

    def get(self, job_id: str) -> Job | None:
        """One job, with its place in the queue (`Job.queue`, from a snapshot at most about
        a second old, gateway/store/queue_place.py)."""
        ...

    def page(
        self,
        status: str | None,
        collection: str | None,
        limit: int,
        cursor: str | None,
        *,
        collections: frozenset[str] | None = None,
        stalled: bool | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered, a page at a time, each with its place in the queue."""
        ...

    def collections_of(self, job_ids: Collection[str]) -> dict[str, str]: ...
    def find_duplicate(
        self,
        collection: str,
        blob_sha256: str,
        idempotency_key: str | None,
        *,
        key_owner: str = OPEN_KEY_OWNER,
    ) -> Job | None:
        """What `create` would answer for an upload, without writing (`IdempotencyKeyReused`
        included)."""
        ...

    def document_collection(self, document_id: str) -> str | None: ...
    def current_job(self, document_id: str) -> Job | None: ...
    def delete_document(self, document_id: str) -> list[JobBlobs]:
        """Forget a document and free its jobs' Idempotency-Keys (the jobs stay, as history);
        returns the blobs its jobs wrote."""
        ...

    def recorded_collection(self, document_id: str) -> str | None:
        """The collection of a document recorded once, live or deleted since (its jobs stay
        as history); None for an id no upload ever had."""
        ...

    def end_deleted_jobs(self, document_id: str) -> list[str]:
        """End the jobs of a deleted document that had not ended: `failed` with code
        `document_deleted` (not retryable), their webhook due like any ended job's. Nothing
        for a live document. Returns the ids of the jobs ended."""
        ...

    def blob_in_use(self, sha256: str) -> bool: ...

    def apply(self, event: JobEvent) -> bool:
        """Fold one event into its job; returns whether anything changed."""
        ...

    def apply_all(self, events: Sequence[JobEvent]) -> set[str]:
        """Fold events into their jobs in one transaction; returns the jobs that changed.
        Events of the webhook side stage change only the job's webhook (`delivered`,
        `retrying`, `failed`, attempts), never its status, error or stages; a job with a
        callback URL that ends has its webhook made `pending` (a new round)."""
        ...

    def reopen(self, job_id: str) -> Job | None:
        """Put a failed job back in flight at the stage that failed (a webhook not yet sent
        waits until it ends again); None if it is not failed."""
        ...

    def claim_webhooks(self, lease_s: float, limit: int) -> list[tuple[Job, str]]:
        """Ended jobs whose webhook is pending and not yet published, whose lease (if any)
        has run out, oldest end first, each with its callback URL and leased for `lease_s`.
        The caller publishes a WebhookRequest for each and calls `webhook_published`."""
        ...

    def webhook_published(self, job_id: str) -> None:
        """The broker confirmed the job's WebhookRequest: it is no longer claimed."""
        ...

    def ping(self) -> None: ...
    def count_by_status(self) -> dict[str, int]: ...
    def collections(self) -> list[CollectionCounts]:
        """Every collection with a document, by name: its documents and indexed chunks."""
        ...


def open_job_store(settings: Settings) -> JobStore:
    """The job store `SLUICE_JOB_STORE_URL` chooses: `postgresql://…` for PostgreSQL, else
    SQLite under the data directory."""
    url = settings.job_store_url
    if url and url.startswith(("postgresql://", "postgres://")):
        from gateway.store.pg_job_store import PgJobStore

        return PgJobStore(
            url,
            pipeline=settings.pipeline,
            stalled_after_s=settings.stalled_after_s,
            admission=Admission.of(settings),
        )
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
        admission=Admission.of(settings),
    )
