"""What the job store keeps of re-indexing: a collection's serving generation, its reindexes,
and the jobs a reindex runs — the records and the seam both stores implement.

A reindex builds generation n+1 of a collection's index beside the serving one, document by
document, from the parsed text of each document's newest indexed version. Its per-document
work are ordinary job rows with a `reindex_id` (and the `source_job_id` of the version they
re-index): they never make a new version of the document (its `current_job_id` stays the
upload's), never count as a duplicate nor as another document, and are admitted when they
are recorded (the reindex monitor paces them to the bulk lane's room itself).

States: `running` (documents going through) → `switching` (every document is in; waiting for
the collection's uploads in flight to end) → `done` (the collection serves the new
generation). `cancelled` and `failed` leave the serving generation as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from contracts.errors import SluiceError
from contracts.messages import IndexProfile

ReindexState = Literal["running", "switching", "done", "cancelled", "failed"]
ACTIVE: tuple[ReindexState, ...] = ("running", "switching")
# A reindex job whose document was deleted meanwhile is no failure of the reindex.
DOCUMENT_DELETED = "document_deleted"


class ReindexInProgress(SluiceError):
    """A reindex was asked for while another one of the collection runs."""

    code = "reindex_in_progress"

    def __init__(self, collection: str, reindex_id: str) -> None:
        super().__init__(
            f"Collection {collection!r} is being re-indexed already (reindex {reindex_id}): "
            "wait for it to end, or cancel it with DELETE /v1/collections/{c}/reindex."
        )
        self.reindex_id = reindex_id


@dataclass(frozen=True)
class Serving:
    """The generation a collection's search answers from, and how it was built (None: the
    deployment's settings)."""

    generation: int = 0
    profile: IndexProfile | None = None


@dataclass(frozen=True)
class Reindex:
    """One re-indexing of a collection into `generation`, with its progress counts."""

    reindex_id: str
    collection: str
    # The generation it builds, and the one that served when it started.
    generation: int
    from_generation: int
    profile: IndexProfile
    state: ReindexState
    created_at: datetime
    finished_at: datetime | None
    documents_total: int
    documents_done: int
    documents_failed: int
    # Whether the generation it made obsolete (the old one once done, its own once cancelled
    # or failed) was dropped from the index.
    dropped: bool

    @property
    def active(self) -> bool:
        """Whether it is still under way (running or switching)."""
        return self.state in ACTIVE


@dataclass(frozen=True)
class ReindexJob:
    """A job recorded for a reindex: what its `DocumentParsed` carries."""

    job_id: str
    reindex_id: str
    document_id: str
    collection: str
    filename: str
    blob_sha256: str
    parsed_sha256: str
    pages: int | None
    generation: int
    profile: IndexProfile | None
    # The generation the version it re-indexes was written to: one no longer served nor
    # built (an upload that ended after the switch) is dropped again once caught up.
    source_generation: int


class ReindexStore(Protocol):
    """The job store's re-indexing part (both stores; tests/unit/test_reindex_store.py)."""

    def serving(self, collection: str) -> Serving:
        """The collection's serving generation (0, the deployment's settings, if none)."""
        ...

    def index_target(self, job_id: str) -> Serving:
        """The generation an upload job's messages build, and its profile: the collection's
        serving one when the job was recorded or admitted."""
        ...

    def restamp(self, job_id: str) -> None:
        """Point a job at its collection's serving generation (before it is sent again)."""
        ...

    def start_reindex(self, reindex_id: str, collection: str, profile: IndexProfile) -> Reindex:
        """Record a running reindex of the collection into its next unused generation;
        `ReindexInProgress` if one is active."""
        ...

    def reindex(self, reindex_id: str) -> Reindex | None:
        """One reindex."""
        ...

    def active_reindex(self, collection: str) -> Reindex | None:
        """The collection's running or switching reindex, if any."""
        ...

    def reindexes_to_watch(self, straggler_window_s: float) -> list[Reindex]:
        """Active reindexes, ended ones whose obsolete generation is not dropped yet, and
        done ones that switched less than `straggler_window_s` ago."""
        ...

    def add_reindex_jobs(self, reindex_id: str, room: int) -> list[ReindexJob]:
        """Record (admitted, unconfirmed) a job for each document of the collection whose
        newest indexed version is not in the reindex's generation and has no job of it yet
        (and none of it in flight), up to `room` in flight; returns them to publish."""
        ...

    def unconfirmed_reindex_jobs(
        self, reindex_id: str, older_than_s: float, lease_s: float
    ) -> list[ReindexJob]:
        """The reindex's jobs recorded more than `older_than_s` ago and never confirmed (their
        gateway died before the publish), leased for `lease_s`: to publish again."""
        ...

    def advance_reindex(self, reindex_id: str, *, force: bool = False) -> Reindex | None:
        """Count the reindex's progress and move it on, in one transaction: `failed` when a
        job of a live document's version failed; with every document in and nothing to add,
        `switching` while an upload of the collection is in flight (unless `force`: the
        monitor's wait for them ran out), else switched: the collection serves the generation
        and the reindex is `done`."""
        ...

    def cancel_reindex(self, collection: str) -> Reindex | None:
        """End the collection's active reindex as `cancelled`; None if none is active."""
        ...

    def reindex_in_flight(self, reindex_id: str) -> int:
        """How many of the reindex's jobs have not ended."""
        ...

    def mark_dropped(self, reindex_id: str) -> None:
        """The generation the reindex made obsolete is gone from the index."""
        ...

    def latest_reindexes(self) -> dict[str, Reindex]:
        """Each collection's newest reindex (its active one, if any)."""
        ...
