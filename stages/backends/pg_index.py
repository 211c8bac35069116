"""The vector index on PostgreSQL with pgvector: one chunks table for every collection, and a
ledger of the batches each document version has written (how completion is known).

Any number of stage processes and gateways on any hosts share it. The schema is created (and
later migrated) by whichever process starts first, under an advisory lock (pg_schema.py).

How the table learns the vector dimension: the `embedding` column is `vector` without a fixed
dimension, and each dimension in use gets its own partial HNSW index over
`embedding::vector(n)` (`WHERE vector_dims(embedding) = n`), created under the schema lock
the first time a batch of that dimension is written. So the whole schema exists before the
first write and needs no DDL on the write path but once per dimension, and a model with
another dimension (a reindex with a new embedder) can write beside the old one instead of
failing on a fixed-width column. Every stored value is a `vector(n)`; searches cast to the
query's dimension, which is what lets the planner use that dimension's index.

How a delete wins over batches still on their way: a deleted document keeps a tombstone
(`sluice_index_tombstones`). Under READ COMMITTED a write that checks for the tombstone in
its own transaction can still miss one committed after its check, while the delete misses its
chunks, not yet committed; so each transaction holds an advisory lock per document, shared by
writers and exclusive for the delete, until it ends. A write then commits entirely before a
delete of the same document begins, and the delete removes its chunks, or it begins after the
delete committed, and it sees the tombstone and stores nothing.

A chunk's `live` column says whether search may find it: a version of several batches is
written pending and published in one transaction (its chunks made live, the other versions'
removed), so a search finds the old version or the new one, never both or neither. Rows
written before the column existed are live (its default); new writes always set it.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg_pool import ConnectionPool

from contracts.errors import Transient
from contracts.messages import EmbeddedBatch
from stages.backends.dimensions import check_dimensions
from stages.backends.pg_schema import SchemaOnce, Step, lock_schema, migrate
from stages.backends.protocols import IndexHit
from stages.backends.versions import Arrival, Version, completed_by, earlier_versions

log = logging.getLogger(__name__)

COMPONENT = "index"
# pgvector's HNSW indexes `vector` values of up to 2,000 dimensions; wider ones are searched
# by a scan (correct, only slower).
_HNSW_MAX_DIMENSIONS = 2000
# pgvector's default `hnsw.ef_search`: an HNSW scan returns about this many candidates.
_EF_SEARCH = 40


_TABLES = """
    CREATE TABLE IF NOT EXISTS sluice_chunks (
        collection text NOT NULL,
        chunk_id text NOT NULL,
        document_id text NOT NULL,
        job_id text NOT NULL,
        filename text NOT NULL,
        chunk_index int NOT NULL,
        page int,
        heading text,
        text text NOT NULL,
        keywords text[],
        embedding vector NOT NULL,
        PRIMARY KEY (collection, chunk_id)
    );
    CREATE INDEX IF NOT EXISTS sluice_chunks_document
        ON sluice_chunks (collection, document_id, job_id);
    CREATE TABLE IF NOT EXISTS sluice_index_batches (
        collection text NOT NULL,
        document_id text NOT NULL,
        job_id text NOT NULL,
        batch_index int NOT NULL,
        batch_count int NOT NULL,
        PRIMARY KEY (collection, document_id, job_id, batch_index)
    )
"""


def _version_1(conn: psycopg.Connection[Any]) -> None:
    """pgvector, the chunks and the ledger of batches."""
    # Chunks are keyed by collection and chunk id, as LanceDB's table per collection is: one
    # chunk id in two collections is two chunks.
    # IF NOT EXISTS alone still needs the privilege to create it; a database where an
    # administrator installed it already must work for an unprivileged user.
    found = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    if found is None:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute(_TABLES)


_TOMBSTONES = """
    CREATE TABLE IF NOT EXISTS sluice_index_tombstones (
        collection text NOT NULL,
        document_id text NOT NULL,
        deleted_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (collection, document_id)
    )
"""

# A version's chunks are pending (not searchable) until its last batch is in. Existing rows
# are live, as they were searchable before; adding a column with a constant default rewrites
# no row.
_LIVE = "ALTER TABLE sluice_chunks ADD COLUMN IF NOT EXISTS live boolean NOT NULL DEFAULT true"

# Migration n takes the schema from version n - 1 to n; append, never edit a released step.
MIGRATIONS: tuple[Step, ...] = (_version_1, _TOMBSTONES, _LIVE)

# The first key of the advisory locks on documents (ASCII "doc" as an int), with a hash of the
# document as the second: the two-key lock space never meets the schema lock's one-key space.
_DOCUMENT_LOCK_CLASS = 0x646F63

_UPSERT_CHUNK = """
    INSERT INTO sluice_chunks (collection, chunk_id, document_id, job_id, filename,
                               chunk_index, page, heading, text, keywords, embedding, live)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::vector, %s)
    ON CONFLICT (collection, chunk_id) DO UPDATE SET
        document_id = EXCLUDED.document_id, job_id = EXCLUDED.job_id,
        filename = EXCLUDED.filename, chunk_index = EXCLUDED.chunk_index,
        page = EXCLUDED.page, heading = EXCLUDED.heading, text = EXCLUDED.text,
        keywords = EXCLUDED.keywords, embedding = EXCLUDED.embedding, live = EXCLUDED.live
"""
_RECORD_BATCH = """
    INSERT INTO sluice_index_batches (collection, document_id, job_id, batch_index, batch_count)
    VALUES (%s, %s, %s, %s, %s)
    ON CONFLICT (collection, document_id, job_id, batch_index)
    DO UPDATE SET batch_count = EXCLUDED.batch_count
"""


def vector_index_name(dimensions: int) -> str:
    """The name of the HNSW index over the chunks of one dimension."""
    return f"sluice_chunks_embedding_{int(dimensions)}_hnsw"


def _dimension_sql(template: str, dimensions: int) -> sql.Composed:
    # A type modifier cannot be a parameter; it is an int of ours, never text from outside.
    return sql.SQL(template).format(
        n=sql.SQL(str(int(dimensions))), name=sql.Identifier(vector_index_name(dimensions))
    )


def _document_key(collection: str, document_id: str) -> int:
    """The second key of a document's advisory lock: a signed 32-bit hash (a collision only
    makes two documents wait for each other)."""
    digest = hashlib.blake2b(f"{collection}/{document_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_documents(
    cur: psycopg.Cursor[Any], collection: str, documents: set[str], *, shared: bool
) -> None:
    """Hold the documents' advisory locks until the transaction ends."""
    lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    # In one order: two writers waiting behind deletes of each other's documents never
    # deadlock.
    for key in sorted({_document_key(collection, d) for d in documents}):
        cur.execute(f"SELECT {lock}(%s, %s)", (_DOCUMENT_LOCK_CLASS, key))


def _vector_text(vector: Sequence[float]) -> str:
    """pgvector's text form, `[x,y,...]` (sent as a parameter, cast by the server)."""
    return "[" + ",".join(map(repr, map(float, vector))) + "]"


class _BinaryVector:
    """One vector in pgvector's binary form: its dimension and a reserved zero (two big-endian
    uint16s), then its big-endian float32s."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _BinaryVectorDumper(Dumper):
    """Sends a `_BinaryVector` as it is, a binary parameter: the server reads it with
    pgvector's own receive function (the statement's `::vector` names the type)."""

    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        """The bytes, already in pgvector's form."""
        data: bytes = obj.data
        return data


def _binary_vectors(matrix: npt.NDArray[np.float32]) -> list[_BinaryVector]:
    """Each row of a float32 matrix as a binary parameter: one byte swap for all of them,
    where the text form formats and parses every float."""
    head = struct.pack(">HH", matrix.shape[1], 0)
    big = matrix.astype(">f4")
    return [_BinaryVector(head + row.tobytes()) for row in big]


def _configure(conn: psycopg.Connection[Any]) -> None:
    # Chunk vectors are written binary (`_binary_vectors`).
    conn.adapters.register_dumper(_BinaryVector, _BinaryVectorDumper)
    # A search filters by collection after the HNSW scan, which alone yields about
    # `ef_search` candidates, so a small collection among big ones could get fewer than k
    # hits. Iterative scans (pgvector 0.8) keep scanning until k rows pass, in exact order.
    conn.execute("SET hnsw.iterative_scan = strict_order")
    conn.commit()


class PgVectorIndex:
    """A `VectorIndex` in one PostgreSQL database with pgvector, shared by every process."""

    def __init__(self, url: str, *, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        self._where = _describe(url)
        self._timeout_s = timeout_s
        self._indexed: set[int] = set()
        self._schema = SchemaOnce()
        # Small: the index stage writes from a few threads, the gateway searches from a few.
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=timeout_s,
            # A server restart leaves dead connections in the pool: test each as it is lent.
            check=ConnectionPool.check_connection,
            configure=_configure,
            name="sluice-index",
            open=True,
        )
        try:
            self._ensure_schema()
        except Transient as exc:
            # A gateway or stage that starts before its database still starts (the pool
            # keeps trying); every call makes the schema first, or fails as `Transient`.
            log.warning("vector index not ready yet: %s", exc)

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    @property
    def schema_version(self) -> int:
        """The index schema's version in the database (0 until it was made)."""
        return self._schema.version

    def _migrate(self) -> int:
        with self._pooled() as conn:
            return migrate(conn, COMPONENT, MIGRATIONS)

    def _ensure_schema(self) -> None:
        try:
            self._schema.ensure(self._migrate)
        except psycopg.Error as exc:
            raise Transient(
                f"Could not prepare the vector index in the PostgreSQL database "
                f"{self._where} ({_reason(exc)}). Check that the server has the pgvector "
                "extension (or that the user may create it) and that the user may create "
                "tables there.",
                code="index_unavailable",
            ) from exc

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection to a database with the schema, in one transaction."""
        self._ensure_schema()
        with self._pooled() as conn:
            yield conn

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in one transaction (committed when the block ends)."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.errors.TransactionRollback as exc:
            # Deadlock or serialization failure between two writers: nothing was written.
            raise Transient(
                f"A write to the vector index in {self._where} conflicted with another one "
                "and was rolled back; it is retried.",
                code="index_unavailable",
            ) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Transient(
                f"The vector index database {self._where} could not be reached within "
                f"{self._timeout_s:g} s or dropped the connection. Check that PostgreSQL is "
                "running there and that SLUICE_INDEX_URL names it; the work is retried.",
                code="index_unavailable",
            ) from exc

    def ensure_vector_index(self, dimensions: int, *, build_memory: str | None = None) -> None:
        """Create the HNSW index for vectors of `dimensions` unless it exists."""
        # The first write of a dimension does this on a table without such rows, so it is
        # instant; a bulk load (COPY) calls it after loading, which builds much faster than
        # growing the graph row by row. `build_memory` is `maintenance_work_mem` for the
        # build: a graph that does not fit in it is built far more slowly.
        if dimensions in self._indexed or dimensions > _HNSW_MAX_DIMENSIONS:
            return
        with self._connection() as conn:
            name = vector_index_name(dimensions)
            found = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
            if found is None or found[0] is None:
                # Under the schema lock: of several processes writing their first batch of a
                # new dimension at once, one builds the index and the others find it.
                lock_schema(conn)
                if build_memory:
                    conn.execute(
                        "SELECT set_config('maintenance_work_mem', %s, true)", (build_memory,)
                    )
                conn.execute(
                    _dimension_sql(
                        "CREATE INDEX IF NOT EXISTS {name} ON sluice_chunks"
                        " USING hnsw ((embedding::vector({n})) vector_cosine_ops)"
                        " WHERE vector_dims(embedding) = {n}",
                        dimensions,
                    )
                )
        self._indexed.add(dimensions)

    def upsert(self, collection: str, batches: Sequence[EmbeddedBatch]) -> None:
        """Insert or replace chunks by chunk id and record each batch (an empty one too); the
        batches of a deleted document are dropped (see the module's docstring)."""
        # A redelivered batch can share a write with its original: keep each id once.
        chunks = {
            c.chunk_id: (b, c, vector)
            for b in batches
            if b.chunks
            for c, vector in zip(b.chunks, _binary_vectors(b.matrix), strict=True)
        }
        for dimensions in {b.vectors.dimensions for b in batches if b.chunks}:
            self.ensure_vector_index(dimensions)
        arrived = sorted(
            {
                (collection, b.document_id, b.job_id, b.batch_index): b.batch_count for b in batches
            }.items()
        )
        with self._connection() as conn, conn.cursor() as cur:
            documents = {b.document_id for b in batches}
            _lock_documents(cur, collection, documents, shared=True)
            gone = self._deleted(cur, collection, documents)
            kept = [b for b in batches if b.document_id not in gone]
            if chunks:
                check_dimensions(collection, self._dimensions(cur, collection), kept)
            live = completed_by(batches, self._arrived(cur, collection, earlier_versions(batches)))
            # Sorted keys: two writers of overlapping rows lock them in one order, so they
            # wait for each other instead of deadlocking.
            rows = [
                (
                    collection,
                    chunk_id,
                    b.document_id,
                    b.job_id,
                    b.filename,
                    c.chunk_index,
                    c.page,
                    c.heading,
                    c.text,
                    c.keywords,
                    vector,
                    (b.document_id, b.job_id) in live,
                )
                for chunk_id, (b, c, vector) in sorted(chunks.items())
            ]
            self._write(
                cur,
                [r for r in rows if r[2] not in gone],
                [(*key, count) for key, count in arrived if key[1] not in gone],
            )

    def _write(
        self,
        cur: psycopg.Cursor[Any],
        rows: list[tuple[Any, ...]],
        arrived: list[tuple[Any, ...]],
    ) -> None:
        """Store chunk rows and ledger rows, in the caller's transaction."""
        if rows:
            cur.executemany(_UPSERT_CHUNK, rows)
        # Same transaction as the chunks: a batch counts as arrived exactly when its chunks
        # are in.
        if arrived:
            cur.executemany(_RECORD_BATCH, arrived)

    @staticmethod
    def _arrived(
        cur: psycopg.Cursor[Any], collection: str, versions: set[Version]
    ) -> list[Arrival]:
        """The batches of these versions the ledger holds (and perhaps others: harmless)."""
        if not versions:
            return []
        cur.execute(
            "SELECT document_id, job_id, batch_index FROM sluice_index_batches"
            " WHERE collection = %s AND document_id = ANY(%s) AND job_id = ANY(%s)",
            (collection, sorted({d for d, _ in versions}), sorted({j for _, j in versions})),
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in cur.fetchall()]

    @staticmethod
    def _dimensions(cur: psycopg.Cursor[Any], collection: str) -> int | None:
        """The dimension of the vectors an index name holds (None: it holds none)."""
        # One row is enough (every write is checked) and cheap: the key starts with the name.
        cur.execute(
            "SELECT vector_dims(embedding) FROM sluice_chunks WHERE collection = %s LIMIT 1",
            (collection,),
        )
        row = cur.fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _deleted(cur: psycopg.Cursor[Any], collection: str, documents: set[str]) -> set[str]:
        """Those of `documents` that have a tombstone in `collection`."""
        cur.execute(
            "SELECT document_id FROM sluice_index_tombstones"
            " WHERE collection = %s AND document_id = ANY(%s)",
            (collection, sorted(documents)),
        )
        return {str(r[0]) for r in cur.fetchall()}

    def is_deleted(self, collection: str, document_id: str) -> bool:
        """Whether the document was deleted (it has a tombstone)."""
        with self._connection() as conn, conn.cursor() as cur:
            return bool(self._deleted(cur, collection, {document_id}))

    def batches_done(self, collection: str, document_id: str, job_id: str) -> int:
        """How many distinct batches of this version (job) of a document were written."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM sluice_index_batches"
                " WHERE collection = %s AND document_id = %s AND job_id = %s",
                (collection, document_id, job_id),
            ).fetchone()
        return int(row[0]) if row else 0

    def publish_version(self, collection: str, document_id: str, job_id: str) -> None:
        """Make a complete version's pending chunks searchable and drop every other version
        of the document (chunks and ledger rows), in one transaction."""
        # The caller has every batch of `job_id` in; one transaction then makes its chunks
        # live and drops the old version's chunks and ledger rows, so a search sees the old
        # version or the new one, never neither or both, and a crash leaves no ledger row
        # without its chunks.
        with self._connection() as conn, conn.cursor() as cur:
            # As a writer: a delete of the document runs wholly before or after this, so the
            # two never wait on each other's rows (a deadlock).
            _lock_documents(cur, collection, {document_id}, shared=True)
            cur.execute(
                "UPDATE sluice_chunks SET live = true WHERE collection = %s"
                " AND document_id = %s AND job_id = %s AND NOT live",
                (collection, document_id, job_id),
            )
            for table in ("sluice_chunks", "sluice_index_batches"):
                cur.execute(
                    sql.SQL(
                        "DELETE FROM {} WHERE collection = %s AND document_id = %s AND job_id <> %s"
                    ).format(sql.Identifier(table)),
                    (collection, document_id, job_id),
                )

    def delete_document(self, collection: str, document_id: str) -> None:
        """Drop every chunk of a document for good: its tombstone and the deletion of its
        chunks commit together, once no write of the document is under way."""
        with self._connection() as conn, conn.cursor() as cur:
            _lock_documents(cur, collection, {document_id}, shared=False)
            cur.execute(
                "INSERT INTO sluice_index_tombstones (collection, document_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (collection, document_id),
            )
            for table in ("sluice_chunks", "sluice_index_batches"):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE collection = %s AND document_id = %s").format(
                        sql.Identifier(table)
                    ),
                    (collection, document_id),
                )

    def chunk_ids(
        self, collection: str, document_id: str, *, searchable_only: bool = False
    ) -> list[str]:
        """The id of every stored chunk of a document (duplicates included, if any), pending
        ones too unless `searchable_only`."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT chunk_id FROM sluice_chunks WHERE collection = %s AND document_id = %s"
                + (" AND live" if searchable_only else ""),
                (collection, document_id),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def chunk_count(self, collection: str) -> int:
        """How many searchable chunks an index name holds (pending ones are not counted)."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM sluice_chunks WHERE collection = %s AND live",
                (collection,),
            ).fetchone()
        return int(row[0]) if row else 0

    def drop_collection(self, collection: str) -> None:
        """Remove every chunk, ledger row and tombstone of an index name, in one transaction."""
        # Rows, not tables: every index name shares the tables, and the vector indexes are
        # per dimension, so a dimension no name uses any more costs an empty index, nothing.
        with self._connection() as conn, conn.cursor() as cur:
            for table in ("sluice_chunks", "sluice_index_batches", "sluice_index_tombstones"):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE collection = %s").format(sql.Identifier(table)),
                    (collection,),
                )

    def search(self, collection: str, vector: Sequence[float], k: int) -> list[IndexHit]:
        """The `k` live chunks nearest to `vector`, best first (score is cosine similarity)."""
        query = _dimension_sql(
            "SELECT document_id, filename, chunk_id, chunk_index, page, text, keywords,"
            " (embedding::vector({n})) <=> %s::vector({n}) AS distance"
            " FROM sluice_chunks"
            " WHERE collection = %s AND vector_dims(embedding) = {n} AND live"
            " ORDER BY distance LIMIT %s",
            len(vector),
        )
        with self._connection() as conn:
            if k > _EF_SEARCH:
                # More candidates than hits wanted, or the graph walk stops short of k.
                conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(k),))
            rows = conn.execute(query, (_vector_text(vector), collection, k)).fetchall()
        return [
            IndexHit(
                document_id=r[0],
                filename=r[1],
                chunk_id=r[2],
                chunk_index=r[3],
                page=r[4],
                text=r[5],
                # pgvector's `<=>` is cosine distance; rounded as LanceDB's scores are.
                score=round(1.0 - float(r[7]), 6),
                keywords=tuple(r[6]) if r[6] is not None else None,
            )
            for r in rows
        ]


def _reason(exc: psycopg.Error) -> str:
    """The server's own words for what went wrong, on one line."""
    primary = exc.diag.message_primary if exc.diag else None
    return " ".join((primary or type(exc).__name__).split())


def _describe(url: str) -> str:
    """Where the database is, for messages (name, host or socket directory, port)."""
    # Never the password: these messages reach logs, job records and people.
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "named by SLUICE_INDEX_URL (the URL does not parse)"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{params.get('dbname') or '(default)'} on {host}{port}"
