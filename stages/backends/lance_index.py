"""The vector index: LanceDB under the data directory, one table per collection."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from pydantic import BaseModel

from contracts.messages import EmbeddedBatch
from stages.infra import memory


class SearchHit(BaseModel):
    """One search result, as the API returns it."""

    document_id: str
    filename: str
    chunk_id: str
    chunk_index: int
    page: int | None
    text: str
    score: float


class VectorIndex(Protocol):
    """Stores chunk vectors per collection and finds the nearest ones."""

    def upsert(self, collection: str, batches: Sequence[EmbeddedBatch]) -> None:
        """Insert or replace the chunks of several batches by chunk id, in one write."""
        ...

    def count(self, collection: str, document_id: str, job_id: str) -> int:
        """How many chunks of this version (job) of a document are stored."""
        ...

    def remove_other_versions(self, collection: str, document_id: str, job_id: str) -> None:
        """Drop a document's chunks written by any job but `job_id` (a replaced version)."""
        ...

    def delete_document(self, collection: str, document_id: str) -> None:
        """Drop every chunk of a document."""
        ...

    def search(self, collection: str, vector: Sequence[float], k: int) -> list[SearchHit]:
        """The `k` chunks nearest to `vector`, best first."""
        ...

    def chunk_ids(self, collection: str, document_id: str) -> list[str]:
        """The id of every stored chunk of a document (duplicates included, if any)."""
        ...


_COMPACT_EVERY = 50


def _schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("job_id", pa.string(), nullable=False),
            pa.field("filename", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("page", pa.int32()),
            pa.field("heading", pa.string()),
            pa.field("text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimensions), nullable=False),
        ]
    )


def _quote(value: str) -> str:
    # Filters are SQL strings; ids are ours, but quote them properly all the same.
    return "'" + value.replace("'", "''") + "'"


class LanceIndex:
    """LanceDB tables named `chunks_<collection>`, created on first write."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._connect()
        self._write_lock = threading.Lock()
        self._writes: dict[str, int] = {}

    def _connect(self) -> None:
        import lancedb

        # Other processes write the same tables: always read the latest committed version.
        self.db = lancedb.connect(self.root, read_consistency_interval=timedelta(0))
        self._tables: dict[str, Any] = {}

    def _table(self, collection: str, dimensions: int | None = None) -> Any | None:
        name = f"chunks_{collection}"
        # Local names: a reconnect from another thread swaps both without breaking this call.
        db, tables = self.db, self._tables
        if name not in tables:
            if name in db.list_tables().tables:
                tables[name] = db.open_table(name)
            elif dimensions is not None:
                tables[name] = db.create_table(name, schema=_schema(dimensions), exist_ok=True)
            else:
                return None
        return tables[name]

    def upsert(self, collection: str, batches: Sequence[EmbeddedBatch]) -> None:
        """Insert or replace the chunks of several batches by chunk id, in one write.

        LanceDB makes a new version per write, so many small writes are slow to write and to
        read: batches share a write, and the table is compacted every `_COMPACT_EVERY` writes.
        """
        rows = [
            {
                "chunk_id": c.chunk_id,
                "document_id": b.document_id,
                "job_id": b.job_id,
                "filename": b.filename,
                "chunk_index": c.chunk_index,
                "page": c.page,
                "heading": c.heading,
                "text": c.text,
                "vector": c.vector,
            }
            for b in batches
            for c in b.chunks
        ]
        # A redelivered batch can share a write with its original: merge_insert matches
        # against the table, not within its own input, so one write must hold each id once.
        rows = list({str(row["chunk_id"]): row for row in rows}.values())
        with self._write_lock:
            table = self._table(collection, dimensions=len(batches[0].chunks[0].vector))
            assert table is not None
            data = pa.Table.from_pylist(rows, schema=table.schema)
            (
                table.merge_insert("chunk_id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(data)
            )
            self._writes[collection] = self._writes.get(collection, 0) + 1
            if self._writes[collection] % _COMPACT_EVERY == 0:
                table.optimize()
                # LanceDB's native state grows with every version a connection has seen
                # (~0.2 MB a write here); a fresh one after each compaction starts it over.
                self._connect()
                memory.give_back()

    def count(self, collection: str, document_id: str, job_id: str) -> int:
        """How many chunks of this version (job) of a document are stored."""
        table = self._table(collection)
        if table is None:
            return 0
        where = f"document_id = {_quote(document_id)} AND job_id = {_quote(job_id)}"
        return int(table.count_rows(where))

    def remove_other_versions(self, collection: str, document_id: str, job_id: str) -> None:
        """Drop a document's chunks written by any job but `job_id` (a replaced version)."""
        table = self._table(collection)
        where = f"document_id = {_quote(document_id)} AND job_id != {_quote(job_id)}"
        # A delete is a new table version even when it matches nothing: skip the common case.
        if table is not None and table.count_rows(where):
            with self._write_lock:
                table.delete(where)

    def delete_document(self, collection: str, document_id: str) -> None:
        """Drop every chunk of a document."""
        table = self._table(collection)
        if table is not None:
            with self._write_lock:
                table.delete(f"document_id = {_quote(document_id)}")

    def chunk_ids(self, collection: str, document_id: str) -> list[str]:
        """The id of every stored chunk of a document (duplicates included, if any)."""
        table = self._table(collection)
        if table is None:
            return []
        rows = (
            table.search()
            .where(f"document_id = {_quote(document_id)}")
            .select(["chunk_id"])
            .limit(None)
            .to_list()
        )
        return [str(r["chunk_id"]) for r in rows]

    def search(self, collection: str, vector: Sequence[float], k: int) -> list[SearchHit]:
        """The `k` chunks nearest to `vector`, best first (score is cosine similarity)."""
        table = self._table(collection)
        if table is None:
            return []
        rows = table.search(list(vector)).distance_type("cosine").limit(k).to_list()
        return [
            SearchHit(
                document_id=r["document_id"],
                filename=r["filename"],
                chunk_id=r["chunk_id"],
                chunk_index=r["chunk_index"],
                page=r["page"],
                text=r["text"],
                score=round(1.0 - float(r["_distance"]), 6),
            )
            for r in rows
        ]
