"""The job store's re-indexing part, one body of tests for SQLite and PostgreSQL: a reindex
takes each document's newest indexed version, its jobs are no version of the document, the
switch waits for uploads in flight and moves the serving generation in one step."""

from __future__ import annotations

import pytest

from contracts.events import JobError
from contracts.messages import IndexProfile
from gateway.store.base import JobStore
from gateway.store.reindex_base import ReindexInProgress
from unit.test_job_store_contract import Backend, backend, event, new_job

__all__ = ["backend"]  # the fixture, imported for its parametrisation over both stores

PARSED = "a" * 64
SMALL = IndexProfile(chunk_max_tokens=128)


def indexed(store: JobStore, job_id: str, document_id: str, chunks: int = 3) -> None:
    """The job went through parse (its parsed text stored) and index."""
    store.apply(event("parse", job=job_id, document_id=document_id, parsed_sha256=PARSED, pages=2))
    store.apply(
        event("index", job=job_id, document_id=document_id, chunks=chunks, chunks_total=chunks)
    )


def uploaded(store: JobStore, job_id: str, document_id: str, *, replaces: bool = False) -> None:
    """A new document (or version), recorded and confirmed, not yet processed."""
    assert store.create(new_job(job_id, document_id, "books", replaces=replaces)) is None
    store.confirm(job_id)


def finish(store: JobStore, reindex_id: str, chunks: int = 5) -> None:
    """Index every job the reindex has to run now."""
    for job in store.add_reindex_jobs(reindex_id, 100):
        store.confirm(job.job_id)
        store.apply(
            event(
                "index",
                job=job.job_id,
                document_id=job.document_id,
                chunks=chunks,
                chunks_total=chunks,
            )
        )


def books(store: JobStore) -> object:
    """The `books` collection as the store counts it."""
    (found,) = [c for c in store.collections() if c.collection == "books"]
    return found


@pytest.fixture
def store(backend: Backend) -> JobStore:
    """A store with two indexed documents in `books` (3 chunks each)."""
    store = backend.open()
    for n in (1, 2):
        uploaded(store, f"u{n}", f"d{n}")
        indexed(store, f"u{n}", f"d{n}")
    return store


def test_a_reindex_runs_a_job_per_document_that_is_no_version_of_it(store: JobStore) -> None:
    started = store.start_reindex("r1", "books", SMALL)
    assert (started.generation, started.from_generation, started.state) == (1, 0, "running")
    assert started.documents_total == 2 and started.documents_done == 0
    with pytest.raises(ReindexInProgress):
        store.start_reindex("r2", "books", SMALL)

    jobs = store.add_reindex_jobs("r1", 100)
    assert sorted(j.document_id for j in jobs) == ["d1", "d2"]
    assert {(j.parsed_sha256, j.pages, j.generation, j.profile) for j in jobs} == {
        (PARSED, 2, 1, SMALL)
    }
    # Nothing twice: a second round adds nothing while they run.
    assert store.add_reindex_jobs("r1", 100) == []
    # They are jobs, but the documents' versions are still the uploads.
    for job in jobs:
        assert store.get(job.job_id).reindex_id == "r1"  # type: ignore[union-attr]
        current = store.current_job(job.document_id)
        assert current is not None and current.reindex_id is None
    assert (books(store).documents, books(store).chunks) == (2, 6)  # type: ignore[attr-defined]
    assert store.serving("books").generation == 0


def test_the_switch_moves_the_serving_generation_once_every_document_is_in(
    store: JobStore,
) -> None:
    store.start_reindex("r1", "books", SMALL)
    first, second = store.add_reindex_jobs("r1", 100)
    store.confirm(first.job_id)
    store.apply(event("index", job=first.job_id, document_id=first.document_id, chunks=5))
    halfway = store.advance_reindex("r1")
    assert halfway is not None
    assert (halfway.state, halfway.documents_done) == ("running", 1)
    store.apply(event("index", job=second.job_id, document_id=second.document_id, chunks=5))
    done = store.advance_reindex("r1")
    assert done is not None and (done.state, done.documents_done) == ("done", 2)
    assert store.serving("books").generation == 1
    assert store.serving("books").profile == SMALL
    counted = books(store)
    assert (counted.generation, counted.chunks, counted.reindex.state) == (1, 10, "done")  # type: ignore[attr-defined]
    # A later upload is recorded into the generation now served, with its profile.
    uploaded(store, "u3", "d3")
    assert store.index_target("u3").generation == 1
    assert store.index_target("u3").profile == SMALL


def test_the_switch_waits_for_an_upload_in_flight_and_catches_it_up(store: JobStore) -> None:
    store.start_reindex("r1", "books", SMALL)
    finish(store, "r1")
    uploaded(store, "u1b", "d1", replaces=True)  # a new version of d1, in flight
    waiting = store.advance_reindex("r1")
    assert waiting is not None and waiting.state == "switching"
    assert store.serving("books").generation == 0
    indexed(store, "u1b", "d1")
    # The new version is indexed in the old generation: it is caught up before the switch.
    behind = store.advance_reindex("r1")
    assert behind is not None and behind.state == "running"
    (catch_up,) = store.add_reindex_jobs("r1", 100)
    assert (catch_up.document_id, catch_up.source_generation) == ("d1", 0)
    store.apply(event("index", job=catch_up.job_id, document_id="d1", chunks=5))
    done = store.advance_reindex("r1")
    assert done is not None and done.state == "done"


def test_a_forced_switch_goes_past_uploads_in_flight_which_are_caught_up_after(
    store: JobStore,
) -> None:
    # A busy collection: an upload is always in flight, so the monitor stops waiting.
    store.start_reindex("r1", "books", SMALL)
    finish(store, "r1")
    uploaded(store, "u3", "d3")
    assert store.advance_reindex("r1").state == "switching"  # type: ignore[union-attr]
    done = store.advance_reindex("r1", force=True)
    assert done is not None and done.state == "done"
    assert store.serving("books").generation == 1
    # The upload was stamped with the old generation; once it ends there, it is caught up.
    assert store.index_target("u3").generation == 0
    indexed(store, "u3", "d3")
    (catch_up,) = store.add_reindex_jobs("r1", 100)
    assert (catch_up.document_id, catch_up.generation, catch_up.source_generation) == ("d3", 1, 0)


def test_a_failed_job_fails_the_reindex_and_serving_stays(store: JobStore) -> None:
    store.start_reindex("r1", "books", SMALL)
    job, _ = store.add_reindex_jobs("r1", 100)
    error = JobError(stage="embed", code="unknown_model", message="no", retryable=False)
    store.apply(event("embed", "failed", job=job.job_id, document_id=job.document_id, error=error))
    failed = store.advance_reindex("r1")
    assert failed is not None and (failed.state, failed.documents_failed) == ("failed", 1)
    assert store.serving("books").generation == 0
    assert store.active_reindex("books") is None
    # The next one builds a generation never used before.
    assert store.start_reindex("r2", "books", SMALL).generation == 2


def test_cancel_ends_the_active_reindex_only(store: JobStore) -> None:
    assert store.cancel_reindex("books") is None
    store.start_reindex("r1", "books", SMALL)
    cancelled = store.cancel_reindex("books")
    assert cancelled is not None and cancelled.state == "cancelled"
    assert store.add_reindex_jobs("r1", 100) == []
    assert store.serving("books").generation == 0
    watched = [r.reindex_id for r in store.reindexes_to_watch(60)]
    assert watched == ["r1"]  # until its generation is dropped
    store.mark_dropped("r1")
    assert store.reindexes_to_watch(0) == []


def test_jobs_of_a_reindex_are_paced_to_the_room_given(store: JobStore) -> None:
    store.start_reindex("r1", "books", SMALL)
    (job,) = store.add_reindex_jobs("r1", 1)
    assert store.add_reindex_jobs("r1", 1) == []
    assert store.reindex_in_flight("r1") == 1
    # Recorded but never confirmed (its gateway died): handed out again, once per lease.
    assert [j.job_id for j in store.unconfirmed_reindex_jobs("r1", -1, 60)] == [job.job_id]
    assert store.unconfirmed_reindex_jobs("r1", -1, 60) == []


def test_a_profile_keeps_the_serving_settings_it_does_not_name(store: JobStore) -> None:
    store.start_reindex("r1", "books", SMALL)
    finish(store, "r1")
    assert store.advance_reindex("r1").state == "done"  # type: ignore[union-attr]
    second = store.start_reindex("r2", "books", IndexProfile(chunk_overlap_tokens=8))
    assert second.profile == IndexProfile(chunk_max_tokens=128, chunk_overlap_tokens=8)
    assert (second.from_generation, second.generation) == (1, 2)


def test_an_upload_that_ends_in_the_old_generation_after_the_switch_is_caught_up(
    store: JobStore,
) -> None:
    # Failed before the switch, replayed from its dead letters after it (`sluice dlq
    # replay`): its messages still name generation 0.
    uploaded(store, "u3", "d3")
    error = JobError(stage="embed", code="boom", message="no", retryable=True)
    store.apply(event("embed", "failed", job="u3", document_id="d3", error=error))
    store.start_reindex("r1", "books", SMALL)
    finish(store, "r1")
    assert store.advance_reindex("r1").state == "done"  # type: ignore[union-attr]
    assert store.reopen("u3") is not None
    indexed(store, "u3", "d3")

    (catch_up,) = store.add_reindex_jobs("r1", 100)
    assert (catch_up.document_id, catch_up.generation, catch_up.source_generation) == ("d3", 1, 0)
    assert "r1" in [r.reindex_id for r in store.reindexes_to_watch(60)]
    # An upload stamped with the generation served needs none.
    uploaded(store, "u4", "d4")
    indexed(store, "u4", "d4")
    assert store.add_reindex_jobs("r1", 100) == []
