"""One body of tests for every `VectorIndex`: LanceDB and PostgreSQL + pgvector must both pass
each of them (the same tests, real implementations). Vectors are small and made by hand, so
every expected score is known."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres import PostgresHandle

from contracts.errors import Permanent, Transient
from contracts.generations import index_name
from contracts.messages import Chunk, EmbeddedBatch, PackedVectors
from stages.backends.lance_index import LanceIndex
from stages.backends.pg_index import MIGRATIONS, PgVectorIndex
from stages.backends.protocols import VectorIndex
from stages.builtin.index import write

DIMENSIONS = 8


@pytest.fixture(params=["lancedb", "pgvector"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    """Each implementation in turn, empty."""
    if request.param == "lancedb":
        yield LanceIndex(tmp_path / "index")
        return
    postgres: PostgresHandle = request.getfixturevalue("postgres")
    pg = PgVectorIndex(postgres.database())
    try:
        yield pg
    finally:
        pg.close()


def at_angle(degrees: float, dimensions: int = DIMENSIONS) -> list[float]:
    """A unit vector in the plane of the first two axes: its cosine with `at_angle(0)` is
    cos(degrees)."""
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians)] + [0.0] * (dimensions - 2)


# A chunk and its vector, as a test names them; `batch` packs the vectors.
Embedded = tuple[Chunk, list[float]]


def chunk(
    chunk_id: str,
    vector: Sequence[float] | None = None,
    *,
    text: str | None = None,
    keywords: list[str] | None = None,
) -> Embedded:
    """A chunk and its vector; its index is the number in its id, its text names it unless
    given."""
    made = Chunk(
        chunk_id=chunk_id,
        chunk_index=int("".join(ch for ch in chunk_id if ch.isdigit()) or 0),
        text=text or f"text of {chunk_id}",
        page=1,
        heading="Heading",
        keywords=keywords,
    )
    return made, list(vector if vector is not None else at_angle(0))


def batch(
    chunks: list[Embedded],
    *,
    index: int = 0,
    count: int = 1,
    job: str = "j1",
    document: str = "d1",
    collection: str = "default",
    generation: int = 0,
) -> EmbeddedBatch:
    """One batch of a document version (job)."""
    return EmbeddedBatch(
        job_id=job,
        document_id=document,
        collection=collection,
        generation=generation,
        filename=f"{document}.pdf",
        batch_index=index,
        batch_count=count,
        chunks_total=max(1, len(chunks)),
        chunks=[c for c, _ in chunks],
        vectors=PackedVectors.pack([v for _, v in chunks]),
    )


def test_a_redelivered_batch_is_stored_once_and_a_rewrite_replaces(index: VectorIndex) -> None:
    first = batch([chunk("c0", at_angle(0)), chunk("c1", at_angle(90))])
    index.upsert("default", [first])
    index.upsert("default", [first])  # redelivered later
    index.upsert("default", [first, first])  # and with its original, in one write
    assert sorted(index.chunk_ids("default", "d1")) == ["c0", "c1"]
    assert index.batches_done("default", "d1", "j1") == 1

    index.upsert("default", [batch([chunk("c0", at_angle(90), text="rewritten")])])
    hits = index.search("default", at_angle(90), k=5)
    assert sorted(h.chunk_id for h in hits) == ["c0", "c1"]
    assert {h.chunk_id: h.text for h in hits}["c0"] == "rewritten"
    assert all(h.score == pytest.approx(1.0, abs=1e-5) for h in hits)


def test_batches_done_counts_distinct_batches_an_empty_one_too(index: VectorIndex) -> None:
    assert index.batches_done("default", "d1", "j1") == 0
    index.upsert("default", [batch([chunk("c0")], index=0, count=3)])
    index.upsert("default", [batch([], index=2, count=3)])  # a stage dropped every chunk
    index.upsert("default", [batch([chunk("c0")], index=0, count=3)])  # redelivered
    assert index.batches_done("default", "d1", "j1") == 2
    index.upsert("default", [batch([chunk("c1")], index=1, count=3)])
    assert index.batches_done("default", "d1", "j1") == 3
    assert index.batches_done("default", "d1", "j2") == 0
    assert index.batches_done("default", "d2", "j1") == 0


def test_publish_version_keeps_only_that_jobs_chunks_and_ledger(
    index: VectorIndex,
) -> None:
    index.upsert("default", [batch([chunk("old0"), chunk("old1")], job="j1")])
    index.upsert("default", [batch([chunk("other")], job="j1", document="d2")])
    index.upsert("default", [batch([chunk("new0")], job="j2", count=2)])
    index.upsert("default", [batch([], job="j2", index=1, count=2)])
    index.publish_version("default", "d1", "j2")
    assert index.chunk_ids("default", "d1") == ["new0"]
    assert index.chunk_ids("default", "d1", searchable_only=True) == ["new0"]
    assert index.batches_done("default", "d1", "j1") == 0
    assert index.batches_done("default", "d1", "j2") == 2
    # Another document's version with the same job id is not touched.
    assert index.chunk_ids("default", "d2") == ["other"]
    assert index.batches_done("default", "d2", "j1") == 1
    index.publish_version("default", "d1", "j2")  # again: nothing left to do
    assert index.chunk_ids("default", "d1") == ["new0"]
    assert sorted(h.chunk_id for h in index.search("default", at_angle(0), k=5)) == [
        "new0",
        "other",
    ]


def test_the_index_stage_swaps_a_version_once_every_batch_is_in(index: VectorIndex) -> None:
    write(index, [batch([chunk("old0", at_angle(0))], job="j1")])
    write(index, [batch([chunk("new0", at_angle(10))], job="j2", index=0, count=2)])
    # The new version is not whole yet: it is stored, pending, and only the old one is found.
    assert sorted(index.chunk_ids("default", "d1")) == ["new0", "old0"]
    assert index.chunk_ids("default", "d1", searchable_only=True) == ["old0"]
    assert [h.chunk_id for h in index.search("default", at_angle(0), k=5)] == ["old0"]
    write(index, [batch([chunk("new1", at_angle(20))], job="j2", index=1, count=2)])
    assert sorted(index.chunk_ids("default", "d1")) == ["new0", "new1"]
    assert sorted(index.chunk_ids("default", "d1", searchable_only=True)) == ["new0", "new1"]
    assert [h.chunk_id for h in index.search("default", at_angle(0), k=5)] == ["new0", "new1"]


def found(index: VectorIndex, document: str = "d1") -> list[str]:
    """The chunk ids of a document that a search finds, sorted."""
    hits = index.search("default", at_angle(0), k=50)
    return sorted(h.chunk_id for h in hits if h.document_id == document)


def test_a_versions_batches_are_not_searchable_until_its_last_batch_is_in(
    index: VectorIndex,
) -> None:
    write(index, [batch([chunk("c0")], index=0, count=3)])
    write(index, [batch([chunk("c2")], index=2, count=3)])
    assert found(index) == []
    assert index.chunk_ids("default", "d1", searchable_only=True) == []
    assert sorted(index.chunk_ids("default", "d1")) == ["c0", "c2"]  # kept for the last one
    write(index, [batch([chunk("c1")], index=1, count=3)])
    assert found(index) == ["c0", "c1", "c2"]
    # A batch redelivered once its version is published stays searchable.
    write(index, [batch([chunk("c0")], index=0, count=3)])
    assert found(index) == ["c0", "c1", "c2"]
    # Every batch of a version in one write: searchable at once.
    write(index, [batch([chunk(f"e{i}")], index=i, count=2, document="d2") for i in range(2)])
    assert found(index, "d2") == ["e0", "e1"]


def test_a_version_that_never_completes_leaves_nothing_searchable_until_a_retry_does(
    index: VectorIndex,
) -> None:
    write(index, [batch([chunk("old0")], job="j1")])
    # Batch 1 of the new version failed for good (dead-lettered); the others were written.
    write(index, [batch([chunk("new0")], job="j2", index=0, count=3)])
    write(index, [batch([chunk("new2")], job="j2", index=2, count=3)])
    assert found(index) == ["old0"]
    assert index.chunk_ids("default", "d1", searchable_only=True) == ["old0"]
    assert index.batches_done("default", "d1", "j2") == 2
    # A retry of the failed batch completes the version: it replaces the old one.
    write(index, [batch([chunk("new1")], job="j2", index=1, count=3)])
    assert found(index) == ["new0", "new1", "new2"]
    assert sorted(index.chunk_ids("default", "d1")) == ["new0", "new1", "new2"]
    assert index.batches_done("default", "d1", "j1") == 0


def test_a_pending_version_of_a_deleted_document_is_dropped_with_it(index: VectorIndex) -> None:
    write(index, [batch([chunk("c0")], index=0, count=2)])
    index.delete_document("default", "d1")
    assert index.chunk_ids("default", "d1") == []
    write(index, [batch([chunk("c1")], index=1, count=2)])
    assert index.chunk_ids("default", "d1") == []
    assert found(index) == []


def test_delete_document_drops_its_chunks_and_ledger_only(index: VectorIndex) -> None:
    index.upsert("default", [batch([chunk("a0"), chunk("a1")], document="d1")])
    index.upsert("default", [batch([chunk("b0")], document="d2")])
    index.delete_document("default", "d1")
    assert index.chunk_ids("default", "d1") == []
    assert index.batches_done("default", "d1", "j1") == 0
    assert index.chunk_ids("default", "d2") == ["b0"]
    assert [h.chunk_id for h in index.search("default", at_angle(0), k=5)] == ["b0"]
    index.delete_document("default", "missing")  # nothing to delete is not an error


def test_search_ranks_by_cosine_similarity_best_first(index: VectorIndex) -> None:
    angles = {"c0": 0, "c1": 30, "c2": 60, "c3": 90, "c4": 120, "c5": 180}
    # Lengths other than one must not matter to a cosine score.
    scaled = {cid: [x * (1 + i) for x in at_angle(a)] for i, (cid, a) in enumerate(angles.items())}
    index.upsert("default", [batch([chunk(cid, v) for cid, v in reversed(scaled.items())])])
    hits = index.search("default", at_angle(0), k=4)
    assert [h.chunk_id for h in hits] == ["c0", "c1", "c2", "c3"]
    for hit in hits:
        assert hit.score == pytest.approx(math.cos(math.radians(angles[hit.chunk_id])), abs=1e-5)
        assert round(hit.score, 6) == hit.score
    best = hits[0]
    assert (best.document_id, best.filename, best.chunk_index) == ("d1", "d1.pdf", 0)
    assert (best.page, best.text) == (1, "text of c0")
    everything = index.search("default", at_angle(180), k=10)
    assert [h.chunk_id for h in everything] == ["c5", "c4", "c3", "c2", "c1", "c0"]
    assert everything[-1].score == pytest.approx(-1.0, abs=1e-5)


def test_search_returns_k_hits_beyond_the_graphs_default_breadth(index: VectorIndex) -> None:
    chunks = [chunk(f"c{i}", at_angle(i)) for i in range(60)]
    index.upsert("default", [batch(chunks)])
    hits = index.search("default", at_angle(0), k=50)
    assert [h.chunk_id for h in hits] == [f"c{i}" for i in range(50)]


def test_keywords_round_trip_and_absent_keywords_stay_none(index: VectorIndex) -> None:
    index.upsert(
        "default",
        [
            batch(
                [
                    chunk("c0", at_angle(0), keywords=["tern", "migration"]),
                    chunk("c1", at_angle(1), keywords=None),
                    chunk("c2", at_angle(2), keywords=[]),
                ]
            )
        ],
    )
    keywords = {h.chunk_id: h.keywords for h in index.search("default", at_angle(0), k=3)}
    assert keywords == {"c0": ("tern", "migration"), "c1": None, "c2": ()}


def test_collections_are_isolated(index: VectorIndex) -> None:
    # The same document and chunk ids in two collections are two documents.
    index.upsert("papers", [batch([chunk("c0", at_angle(0), text="paper")], collection="papers")])
    index.upsert("notes", [batch([chunk("c0", at_angle(5), text="note")], collection="notes")])
    assert [h.text for h in index.search("papers", at_angle(0), k=5)] == ["paper"]
    assert [h.text for h in index.search("notes", at_angle(0), k=5)] == ["note"]
    index.delete_document("papers", "d1")
    assert index.chunk_ids("papers", "d1") == []
    assert index.batches_done("papers", "d1", "j1") == 0
    assert index.chunk_ids("notes", "d1") == ["c0"]
    assert index.batches_done("notes", "d1", "j1") == 1
    assert index.search("unknown", at_angle(0), k=5) == []


def test_collections_may_hold_vectors_of_different_dimensions(index: VectorIndex) -> None:
    small = [chunk("c0", at_angle(0, 4)), chunk("c1", at_angle(45, 4))]
    index.upsert("small", [batch(small, collection="small")])
    index.upsert("wide", [batch([chunk("c0", at_angle(0, 16))], collection="wide")])
    assert [h.chunk_id for h in index.search("small", at_angle(40, 4), k=5)] == ["c1", "c0"]
    assert [h.chunk_id for h in index.search("wide", at_angle(0, 16), k=5)] == ["c0"]


def test_chunk_ids_lists_every_chunk_of_a_document(index: VectorIndex) -> None:
    assert index.chunk_ids("default", "d1") == []
    index.upsert(
        "default",
        [
            batch([chunk(f"c{i}") for i in range(3)], index=0, count=2),
            batch([chunk(f"c{i}") for i in range(3, 5)], index=1, count=2),
        ],
    )
    assert sorted(index.chunk_ids("default", "d1")) == [f"c{i}" for i in range(5)]
    assert index.chunk_ids("default", "d2") == []


# Generations: a reindex builds `<collection>.g<n>` beside the serving index, then drops the
# old one; each index name is an index of its own.


def papers(generation: int, chunks: list[Embedded], **fields: Any) -> EmbeddedBatch:
    """A batch of collection "papers" in a generation."""
    return batch(chunks, collection="papers", generation=generation, **fields)


def test_a_version_published_in_a_new_generation_leaves_the_serving_ones_chunks(
    index: VectorIndex,
) -> None:
    # The same document and chunk ids (a reindex keeps both), in two generations.
    write(index, [papers(0, [chunk("c0"), chunk("c1")], job="j1")])
    write(index, [papers(1, [chunk("c0", at_angle(0, 16))], job="j2", index=0, count=2)])
    write(index, [papers(1, [chunk("c1", at_angle(0, 16))], job="j2", index=1, count=2)])
    assert sorted(index.chunk_ids("papers", "d1", searchable_only=True)) == ["c0", "c1"]
    assert index.batches_done("papers", "d1", "j1") == 1
    assert sorted(index.chunk_ids("papers.g1", "d1", searchable_only=True)) == ["c0", "c1"]
    assert index.batches_done("papers.g1", "d1", "j2") == 2
    assert index.batches_done("papers.g1", "d1", "j1") == 0
    assert len(index.search("papers", at_angle(0), k=5)) == 2
    assert len(index.search("papers.g1", at_angle(0, 16), k=5)) == 2
    # A new upload during the reindex goes to both; a delete is done in each by name.
    index.delete_document("papers.g1", "d1")
    assert index.chunk_ids("papers.g1", "d1") == []
    assert sorted(index.chunk_ids("papers", "d1")) == ["c0", "c1"]
    assert not index.is_deleted("papers", "d1")


def test_drop_collection_removes_one_generation_and_leaves_the_others(
    index: VectorIndex,
) -> None:
    write(index, [papers(0, [chunk("c0")])])
    write(index, [papers(1, [chunk("c0", at_angle(0, 16)), chunk("c1", at_angle(5, 16))])])
    write(index, [papers(1, [chunk("p0", at_angle(0, 16))], job="j2", count=2)])  # pending
    index.delete_document("papers.g1", "gone")
    write(index, [papers(2, [chunk("c0")])])
    write(index, [batch([chunk("o0")], collection="other")])
    index.drop_collection("papers.g1")
    assert index.chunk_count("papers.g1") == 0
    assert index.chunk_ids("papers.g1", "d1") == []
    assert index.search("papers.g1", at_angle(0, 16), k=5) == []
    assert index.batches_done("papers.g1", "d1", "j1") == 0
    assert index.batches_done("papers.g1", "d1", "j2") == 0
    assert not index.is_deleted("papers.g1", "gone")
    for name in ("papers", "papers.g2", "other"):
        assert index.chunk_count(name) == 1
        assert len(index.search(name, at_angle(0), k=5)) == 1
        assert index.batches_done(name, "d1", "j1") == 1
    index.drop_collection("papers.g1")  # again: nothing left to drop
    index.drop_collection("never")
    # A name dropped is a name like any other: written again, it starts anew.
    write(index, [papers(1, [chunk("n0")], job="j3")])
    assert [h.chunk_id for h in index.search("papers.g1", at_angle(0), k=5)] == ["n0"]


def test_vectors_of_another_dimension_than_an_index_names_are_refused_for_good(
    index: VectorIndex,
) -> None:
    write(index, [papers(0, [chunk("c0")])])
    with pytest.raises(Permanent) as raised:
        write(index, [papers(0, [chunk("w0", at_angle(0, 16))], document="d2")])
    assert raised.value.code == "model_dimensions"
    assert "'papers'" in raised.value.message and "16" in raised.value.message
    with pytest.raises(Permanent):
        # Two batches in one write: one batch's vectors all have one dimension (packed).
        mixed = [batch([chunk("a0")]), batch([chunk("a1", at_angle(0, 16))], document="d3")]
        index.upsert("fresh", mixed)
    assert index.chunk_ids("papers", "d2") == []
    assert index.batches_done("papers", "d2", "j1") == 0
    # Another generation is another index: a new model's dimension is its own.
    write(index, [papers(1, [chunk("w0", at_angle(0, 16))], document="d2")])
    assert index.chunk_count("papers.g1") == 1


def test_chunk_count_counts_searchable_chunks_only(index: VectorIndex) -> None:
    assert index.chunk_count("papers.g1") == 0
    write(index, [papers(1, [chunk("c0"), chunk("c1")], job="j1")])
    write(index, [papers(1, [chunk("n0")], job="j2", index=0, count=2)])
    write(index, [papers(1, [chunk("e0")], document="d2", index=0, count=2)])
    assert index.chunk_count("papers.g1") == 2
    write(index, [papers(1, [chunk("n1"), chunk("n2")], job="j2", index=1, count=2)])
    assert index.chunk_count("papers.g1") == 3  # j2 replaced j1
    assert index.chunk_count("papers") == 0
    assert index.chunk_count(index_name("papers", 1)) == 3


def test_a_generation_dropped_by_another_process_is_gone_for_this_one_too(
    pair: tuple[VectorIndex, VectorIndex],
) -> None:
    stage, gateway = pair
    write(stage, [papers(1, [chunk("c0")], job="j1")])
    assert [h.chunk_id for h in gateway.search("papers.g1", at_angle(0), k=5)] == ["c0"]
    gateway.drop_collection("papers.g1")
    assert stage.search("papers.g1", at_angle(0), k=5) == []
    assert stage.chunk_count("papers.g1") == 0
    # A late batch of the dropped generation is written to a new table, not lost in an error.
    write(stage, [papers(1, [chunk("c1")], job="j2")])
    assert gateway.chunk_ids("papers.g1", "d1") == ["c1"]


# Chunks stored before pending versions existed were all searchable, and stay so.


def assert_legacy_chunk_is_searchable(index: VectorIndex) -> None:
    """The legacy chunk `c0` of d1 is found, and the index takes versions as usual after."""
    assert found(index) == ["c0"]
    assert index.chunk_ids("default", "d1", searchable_only=True) == ["c0"]
    write(index, [batch([chunk("n0")], job="j2", index=0, count=2)])
    assert found(index) == ["c0"]
    write(index, [batch([chunk("n1")], job="j2", index=1, count=2)])
    assert found(index) == ["n0", "n1"]


def test_lance_chunks_of_a_table_without_the_live_column_are_searchable(tmp_path: Path) -> None:
    import lancedb
    import pyarrow as pa

    from stages.backends import lance_index

    old = pa.schema([f for f in lance_index._schema(DIMENSIONS) if f.name != "live"])
    db = lancedb.connect(tmp_path / "index")
    row = {
        "chunk_id": "c0",
        "document_id": "d1",
        "job_id": "j1",
        "filename": "d1.pdf",
        "chunk_index": 0,
        "page": 1,
        "heading": None,
        "text": "text of c0",
        "keywords": None,
        "vector": at_angle(0),
    }
    db.create_table("chunks_default", data=pa.Table.from_pylist([row], schema=old))
    assert_legacy_chunk_is_searchable(LanceIndex(tmp_path / "index"))


def test_lance_a_batch_recorded_before_ledger_keys_named_the_index_counts_once(
    tmp_path: Path,
) -> None:
    from stages.backends import lance_index

    lance = LanceIndex(tmp_path / "index")
    lance.upsert("default", [batch([chunk("c0")], index=0, count=2)])
    # The same batch's row as an older Sluice keyed it, and then redelivered: one batch.
    old = {"collection": "default", "document_id": "d1", "job_id": "j1", "batch_count": 2}
    lance_index._merge(lance._ledger(), "key", [{"key": "d1/j1/0", **old, "batch_index": 0}])
    assert lance.batches_done("default", "d1", "j1") == 1
    write(lance, [batch([chunk("c1")], index=1, count=2)])
    assert sorted(lance.chunk_ids("default", "d1", searchable_only=True)) == ["c0", "c1"]


def test_pg_chunks_stored_before_the_live_column_are_searchable(
    postgres: PostgresHandle,
) -> None:
    from stages.backends.pg_schema import migrate

    url = postgres.database()
    with psycopg.connect(url) as db:
        migrate(db, "index", MIGRATIONS[:2])
        db.execute(
            "INSERT INTO sluice_chunks (collection, chunk_id, document_id, job_id, filename,"
            " chunk_index, page, heading, text, keywords, embedding)"
            " VALUES ('default', 'c0', 'd1', 'j1', 'd1.pdf', 0, 1, NULL, 'text of c0', NULL,"
            " %s::vector)",
            (str(at_angle(0)),),
        )
    pg = PgVectorIndex(url)
    try:
        assert pg.schema_version == len(MIGRATIONS)
        assert_legacy_chunk_is_searchable(pg)
    finally:
        pg.close()


# What only PostgreSQL has: several processes sharing one database, and a server to lose.


def test_indexes_started_at_once_on_an_empty_database_all_come_up(
    postgres: PostgresHandle,
) -> None:
    name = f"empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = postgres.url(name)  # no vector extension yet: the first index creates it
    start = threading.Barrier(4)
    opened: list[PgVectorIndex] = []
    failed: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PgVectorIndex(url))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(start.parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert failed == []
        assert len(opened) == start.parties
        assert {pg.schema_version for pg in opened} == {len(MIGRATIONS)}
        opened[0].upsert("default", [batch([chunk("c0")])])
        assert opened[-1].chunk_ids("default", "d1") == ["c0"]
    finally:
        for pg in opened:
            pg.close()
    with psycopg.connect(url) as db:
        versions = db.execute("SELECT component, version FROM sluice_schema_versions").fetchall()
    assert versions == [("index", len(MIGRATIONS))]


def test_an_unreachable_database_is_a_transient_error_a_person_can_act_on(
    tmp_path: Path,
) -> None:
    url = f"postgresql://sluice:secret-password@/sluice?host={tmp_path}"
    # A process that starts before its database still starts; its calls fail until it answers.
    pg = PgVectorIndex(url, timeout_s=0.5)
    try:
        with pytest.raises(Transient) as raised:
            pg.search("default", at_angle(0), k=5)
    finally:
        pg.close()
    assert raised.value.code == "index_unavailable"
    message = raised.value.message
    assert "secret-password" not in message
    assert "sluice on " in message and "SLUICE_INDEX_URL" in message


def test_the_hnsw_index_answers_a_small_collection_among_a_big_one(
    postgres: PostgresHandle,
) -> None:
    url = postgres.database()
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        # Tables this small are scanned, not searched through the graph, unless told not to.
        admin.execute(
            psycopg.sql.SQL("ALTER DATABASE {} SET enable_seqscan = off").format(
                psycopg.sql.Identifier(str(name))
            )
        )
    pg = PgVectorIndex(url)
    try:
        big = [chunk(f"c{i}", at_angle(i / 2)) for i in range(300)]
        pg.upsert("big", [batch(big, collection="big")])
        small = [chunk(f"s{i}", at_angle(90 + i)) for i in range(3)]
        pg.upsert("small", [batch(small, collection="small")])
        with psycopg.connect(url) as db:
            plan = db.execute(
                "EXPLAIN SELECT chunk_id FROM sluice_chunks"
                " WHERE collection = 'small' AND vector_dims(embedding) = 8"
                " ORDER BY (embedding::vector(8)) <=> %s::vector(8) LIMIT 5",
                (str(at_angle(0)),),
            ).fetchall()
        assert "sluice_chunks_embedding_8_hnsw" in " ".join(str(row[0]) for row in plan)
        # The graph walk meets the big collection's chunks first; the scan goes on until the
        # small one's are found.
        assert [h.chunk_id for h in pg.search("small", at_angle(0), k=5)] == ["s0", "s1", "s2"]
        hits = pg.search("big", at_angle(0), k=100)
        assert [h.chunk_id for h in hits] == [f"c{i}" for i in range(100)]
    finally:
        pg.close()


# A delete wins: a document deleted while batches of it are on their way (in a queue, in
# another process's write) keeps nothing in the index, in every order the two can meet.

DOC = "d" * 32
OTHER_DOC = "e" * 32
JOB = "a" * 32
NEW_JOB = "b" * 32


@pytest.fixture(params=["lancedb", "pgvector"])
def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[VectorIndex, VectorIndex]]:
    """Two handles on one index, as the index stage and a gateway hold it (each implementation
    in turn, empty)."""
    if request.param == "lancedb":
        yield LanceIndex(tmp_path / "index"), LanceIndex(tmp_path / "index")
        return
    postgres: PostgresHandle = request.getfixturevalue("postgres")
    url = postgres.database()
    stage, gateway = PgVectorIndex(url), PgVectorIndex(url)
    try:
        yield stage, gateway
    finally:
        stage.close()
        gateway.close()


def doc_batch(chunk_ids: list[str], index: int, count: int, *, job: str = JOB) -> EmbeddedBatch:
    """Batch `index` of `count` of DOC's version `job`."""
    return batch([chunk(c) for c in chunk_ids], index=index, count=count, job=job, document=DOC)


def assert_gone(index: VectorIndex, *jobs: str) -> None:
    """Nothing of DOC is stored, searchable, or counted as arrived."""
    assert index.chunk_ids("default", DOC) == []
    assert [h for h in index.search("default", at_angle(0), k=50) if h.document_id == DOC] == []
    assert [index.batches_done("default", DOC, job) for job in jobs] == [0] * len(jobs)
    assert index.is_deleted("default", DOC)


def test_batches_that_arrive_after_a_delete_leave_nothing(
    pair: tuple[VectorIndex, VectorIndex],
) -> None:
    stage, gateway = pair
    assert not stage.is_deleted("default", DOC)
    write(stage, [doc_batch(["c0", "c1"], 0, 3)])
    gateway.delete_document("default", DOC)
    # The late batches share a write with another document's, which is kept.
    other = batch([chunk("o0")], job=JOB, document=OTHER_DOC)
    write(stage, [doc_batch(["c2"], 1, 3), other])
    write(stage, [doc_batch(["c3"], 2, 3)])
    write(stage, [doc_batch(["c0", "c1"], 0, 3)])  # and the first one, redelivered
    assert_gone(stage, JOB)
    assert_gone(gateway, JOB)
    assert stage.chunk_ids("default", OTHER_DOC) == ["o0"]
    assert not stage.is_deleted("default", OTHER_DOC)
    # The tombstone is per collection: the same id elsewhere is another document.
    stage.upsert("other", [batch([chunk("x0")], job=JOB, document=DOC, collection="other")])
    assert stage.chunk_ids("other", DOC) == ["x0"]


def test_a_document_deleted_before_any_batch_arrived_is_never_stored(
    pair: tuple[VectorIndex, VectorIndex],
) -> None:
    stage, gateway = pair
    gateway.delete_document("default", DOC)  # no chunks table, no ledger yet
    gateway.delete_document("default", DOC)  # deleting again is harmless
    write(stage, [doc_batch(["c0"], 0, 2), doc_batch(["c1"], 1, 2)])
    assert_gone(stage, JOB)


def test_a_new_version_of_a_deleted_document_does_not_bring_it_back(
    pair: tuple[VectorIndex, VectorIndex],
) -> None:
    stage, gateway = pair
    write(stage, [doc_batch(["old0"], 0, 1)])
    write(stage, [doc_batch(["new0"], 0, 2, job=NEW_JOB)])
    gateway.delete_document("default", DOC)
    # The new version's last batch: once "every batch is in" it would swap versions.
    write(stage, [doc_batch(["new1"], 1, 2, job=NEW_JOB)])
    stage.publish_version("default", DOC, NEW_JOB)
    assert_gone(stage, JOB, NEW_JOB)


def test_lance_a_delete_between_a_writes_look_and_its_chunks_still_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LanceDB has no transaction across tables: the whole delete (tombstone, then chunks)
    # lands after the write looked for a tombstone and before its chunks are committed, so
    # the delete finds nothing to remove; the write's look after its commit must.
    stage, gateway = LanceIndex(tmp_path / "index"), LanceIndex(tmp_path / "index")
    stage.upsert("default", [doc_batch(["c0"], 0, 2)])
    looked = stage._deleted

    def then_deleted(collection: str, documents: set[str]) -> set[str]:
        found = looked(collection, documents)
        if not gateway.is_deleted("default", DOC):
            gateway.delete_document("default", DOC)
        return found

    monkeypatch.setattr(stage, "_deleted", then_deleted)
    stage.upsert("default", [doc_batch(["c1"], 1, 2)])
    assert_gone(stage, JOB)
    assert_gone(gateway, JOB)


def _waiting_on_advisory_locks(url: str, deadline_s: float = 30.0) -> None:
    """Return once a session of the database waits for an advisory lock (or fail)."""
    deadline = time.monotonic() + deadline_s
    with psycopg.connect(url, autocommit=True) as db:
        while time.monotonic() < deadline:
            waiting = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.02)
    raise AssertionError("nobody waited for the document's lock")


def test_pg_a_delete_waits_for_a_write_under_way_then_removes_it(
    postgres: PostgresHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.database()
    stage, gateway = PgVectorIndex(url), PgVectorIndex(url)
    try:
        # The write has looked for a tombstone (none) and is storing its chunks when the
        # delete begins: under READ COMMITTED the delete would not see them, and they would
        # commit after it. It waits for the write's transaction, then sees them.
        stored = stage._write
        deleting: list[threading.Thread] = []

        def delete_meanwhile(cur: psycopg.Cursor[Any], rows: Any, arrived: Any) -> None:
            deleter = threading.Thread(target=gateway.delete_document, args=("default", DOC))
            deleter.start()
            deleting.append(deleter)
            _waiting_on_advisory_locks(url)
            stored(cur, rows, arrived)

        monkeypatch.setattr(stage, "_write", delete_meanwhile)
        stage.upsert("default", [doc_batch(["c0", "c1"], 0, 1)])
        deleting[0].join(timeout=30)
        assert not deleting[0].is_alive()
        assert_gone(stage, JOB)
    finally:
        stage.close()
        gateway.close()


def test_pg_a_write_waits_for_a_delete_under_way_then_drops_its_batch(
    postgres: PostgresHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.backends import pg_index

    url = postgres.database()
    stage, gateway = PgVectorIndex(url), PgVectorIndex(url)
    try:
        # The delete holds its lock, tombstone not yet committed, when a batch arrives: the
        # write waits for it, then finds the tombstone.
        lock = pg_index._lock_documents
        writing: list[threading.Thread] = []

        def write_meanwhile(
            cur: psycopg.Cursor[Any], collection: str, documents: set[str], *, shared: bool
        ) -> None:
            lock(cur, collection, documents, shared=shared)
            if not shared and not writing:
                batches = [doc_batch(["c0"], 0, 1)]
                writer = threading.Thread(target=stage.upsert, args=("default", batches))
                writer.start()
                writing.append(writer)
                _waiting_on_advisory_locks(url)

        monkeypatch.setattr(pg_index, "_lock_documents", write_meanwhile)
        gateway.delete_document("default", DOC)
        writing[0].join(timeout=30)
        assert not writing[0].is_alive()
        assert_gone(stage, JOB)
    finally:
        stage.close()
        gateway.close()
