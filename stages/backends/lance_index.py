"""The vector index on LanceDB under the data directory: a chunks table per collection, one
ledger of the batches each document version has written (how completion is known), and a
tombstone per deleted document (how a delete wins over batches still on their way).

A delete and a write of the same document may run at once in two processes, and LanceDB has
no transaction across tables; each table's commit is atomic, and with a read consistency
interval of zero every read and every delete starts from the latest committed version. So a
delete writes its tombstone first and then deletes the chunks, and a write stores its chunks
first and then looks for a tombstone, removing what it stored if it finds one: if the write's
look came before the tombstone, the chunks were committed before the delete began, and the
delete removes them; otherwise the write sees the tombstone. Either way nothing is left.

A chunk's `live` column says whether search may find it: a version of several batches is
written pending and published by two commits, its chunks made live first and the other
versions' removed after, so a search meanwhile finds both (briefly), never neither. Tables
written before the column existed get it with every row live.

Each index name (a collection's generation) is a table of its own, `chunks_<name>`, so two
generations may hold vectors of different dimensions. A generation no longer served is
dropped, table and all, maybe by another process: a table this one had open is then opened
again (`_reopens_dropped`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa

from contracts.errors import StorageFull, is_disk_full
from contracts.messages import EmbeddedBatch
from stages.backends.dimensions import check_dimensions
from stages.backends.protocols import IndexHit
from stages.backends.versions import Arrival, Version, completed_by, earlier_versions
from stages.infra import memory

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
            pa.field("keywords", pa.list_(pa.string())),
            pa.field("vector", pa.list_(pa.float32(), dimensions), nullable=False),
            # Last, as in a table that got it by `_upgraded`.
            pa.field("live", pa.bool_(), nullable=False),
        ]
    )


_LEDGER = "batches"
_LEDGER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("collection", pa.string(), nullable=False),
        pa.field("document_id", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("batch_index", pa.int32(), nullable=False),
        pa.field("batch_count", pa.int32(), nullable=False),
    ]
)


_TOMBSTONES = "tombstones"
_TOMBSTONE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("collection", pa.string(), nullable=False),
        pa.field("document_id", pa.string(), nullable=False),
    ]
)


P = ParamSpec("P")
R = TypeVar("R")


def _reopens_dropped(
    method: Callable[Concatenate[LanceIndex, P], R],
) -> Callable[Concatenate[LanceIndex, P], R]:
    """Run a call again on freshly opened tables when a table it used was dropped meanwhile:
    a handle this process kept fails on a table another one dropped (LanceDB: "Not found")."""

    @functools.wraps(method)
    def call(self: LanceIndex, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except (RuntimeError, OSError) as exc:
            if "Not found" not in str(exc):
                raise
            # Every call these wrap may run twice: writes are upserts, deletes are idempotent.
            self._tables = {}
            return method(self, *args, **kwargs)

    return call


def _quote(value: str) -> str:
    # Filters are SQL strings; ids are ours, but quote them properly all the same.
    return "'" + value.replace("'", "''") + "'"


class LanceIndex:
    """A `VectorIndex`: LanceDB tables named `chunks_<collection>`, created on first write."""

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
            opened = _opened(db, name) if name in db.list_tables().tables else None
            if opened is not None:
                tables[name] = opened
            elif dimensions is not None:
                tables[name] = db.create_table(name, schema=_schema(dimensions), exist_ok=True)
            else:
                return None
        return tables[name]

    def _has_ledger(self) -> bool:
        # Asked on every completion check: once this connection opened the ledger, the
        # database need not be listed again.
        return _LEDGER in self._tables or _LEDGER in self.db.list_tables().tables

    def _ledger(self) -> Any:
        db, tables = self.db, self._tables
        if _LEDGER not in tables:
            tables[_LEDGER] = db.create_table(_LEDGER, schema=_LEDGER_SCHEMA, exist_ok=True)
        return tables[_LEDGER]

    @_reopens_dropped
    def upsert(self, collection: str, batches: Sequence[EmbeddedBatch]) -> None:
        """Insert or replace the chunks of several batches by chunk id, in one write; the
        batches of a deleted document are dropped (see the module's docstring).

        LanceDB makes a new version per write, so many small writes are slow to write and to
        read: batches share a write, and the table is compacted every `_COMPACT_EVERY` writes.
        """
        gone = self._deleted(collection, {b.document_id for b in batches})
        if gone:
            # A write that died between its chunks and its look for a tombstone left them.
            self._purge(collection, gone)
            batches = [b for b in batches if b.document_id not in gone]
            if not batches:
                return
        live = self._completed(collection, batches)
        arrived = {
            _ledger_key(collection, b): {
                "key": _ledger_key(collection, b),
                "collection": collection,
                "document_id": b.document_id,
                "job_id": b.job_id,
                "batch_index": b.batch_index,
                "batch_count": b.batch_count,
            }
            for b in batches
        }
        with self._write_lock, self._full_disk_is_transient(collection):
            if any(b.chunks for b in batches):
                existing = self._table(collection)
                held = None if existing is None else existing.schema.field("vector").type.list_size
                check_dimensions(collection, held, batches)
                dimensions = next(b.vectors.dimensions for b in batches if b.chunks)
                table = self._table(collection, dimensions=dimensions)
                assert table is not None
                _merge(table, "chunk_id", _chunk_rows(table.schema, batches, live))
            # Chunks first, then the ledger: a batch counts as arrived only once its chunks
            # are in, so a crash between the two writes redoes the batch, never skips it.
            ledger = self._ledger()
            _merge(ledger, "key", pa.Table.from_pylist(list(arrived.values()), ledger.schema))
            self._writes[collection] = self._writes.get(collection, 0) + 1
            if self._writes[collection] % _COMPACT_EVERY == 0:
                # Tombstones too: gateways add one a delete, and never compact.
                tombstones = self._tables.get(_TOMBSTONES)
                for compacted in (self._table(collection), ledger, tombstones):
                    if compacted is not None:
                        compacted.optimize()
                # LanceDB's native state grows with every version a connection has seen
                # (~0.2 MB a write here); a fresh one after each compaction starts it over.
                self._connect()
                memory.give_back()
        self._undo_if_deleted(collection, {b.document_id for b in batches})

    def _completed(self, collection: str, batches: Sequence[EmbeddedBatch]) -> set[Version]:
        """The versions of `batches` that are complete once they are written."""
        versions = earlier_versions(batches)
        arrived: list[Arrival] = []
        if versions and self._has_ledger():
            documents = _quoted({d for d, _ in versions})
            jobs = _quoted({j for _, j in versions})
            # A stale read only counts too few batches: the version is then written pending
            # and published after, as if this write had not completed it.
            rows = (
                self._ledger()
                .search()
                .where(
                    f"collection = {_quote(collection)} AND document_id IN ({documents})"
                    f" AND job_id IN ({jobs})"
                )
                .select(["document_id", "job_id", "batch_index"])
                .limit(None)
                .to_list()
            )
            arrived = [
                (str(r["document_id"]), str(r["job_id"]), int(r["batch_index"])) for r in rows
            ]
        return completed_by(batches, arrived)

    def _undo_if_deleted(self, collection: str, documents: set[str]) -> None:
        """Remove what a write just stored for documents deleted while it was written."""
        # Only after the write is committed: see the module's docstring for why this order
        # leaves nothing of a deleted document, whichever process gets there first.
        late = self._deleted(collection, documents)
        if late:
            self._purge(collection, late)

    def _deleted(self, collection: str, documents: set[str]) -> set[str]:
        """Those of `documents` that have a tombstone in `collection`."""
        if not documents or not self._has_table(_TOMBSTONES):
            return set()
        rows = (
            self._tombstones()
            .search()
            .where(f"collection = {_quote(collection)} AND document_id IN ({_quoted(documents)})")
            .select(["document_id"])
            .limit(None)
            .to_list()
        )
        return {str(r["document_id"]) for r in rows}

    def _purge(self, collection: str, documents: set[str]) -> None:
        """Drop the chunks and ledger rows of deleted documents, if any are left."""
        table = self._table(collection)
        where = f"document_id IN ({_quoted(documents)})"
        ledger_where = f"collection = {_quote(collection)} AND {where}"
        # A delete is a new table version even when it matches nothing: skip the common case
        # (the delete itself removed everything, and a late batch only finds its tombstone).
        with self._write_lock, self._full_disk_is_transient(collection):
            if table is not None and table.count_rows(where):
                table.delete(where)
            if self._has_ledger() and self._ledger().count_rows(ledger_where):
                self._ledger().delete(ledger_where)

    def _has_table(self, name: str) -> bool:
        # Only a table found is remembered: another process may create it at any moment.
        return name in self._tables or name in self.db.list_tables().tables

    def _tombstones(self) -> Any:
        db, tables = self.db, self._tables
        if _TOMBSTONES not in tables:
            tables[_TOMBSTONES] = db.create_table(
                _TOMBSTONES, schema=_TOMBSTONE_SCHEMA, exist_ok=True
            )
        return tables[_TOMBSTONES]

    def is_deleted(self, collection: str, document_id: str) -> bool:
        """Whether the document was deleted (it has a tombstone)."""
        return bool(self._deleted(collection, {document_id}))

    @contextmanager
    def _full_disk_is_transient(self, collection: str) -> Iterator[None]:
        """LanceDB's "No space left on device" as `StorageFull`, retried until space returns.

        A write cut short leaves no table version behind (LanceDB commits a version last), so
        the retry finds the table as it was before.
        """
        try:
            yield
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            raise StorageFull(
                f"the index at {self.root} has no space left to write collection "
                f"{collection!r}; free space on its disk: the index stage retries the write "
                "until it fits"
            ) from exc

    def batches_done(self, collection: str, document_id: str, job_id: str) -> int:
        """How many distinct batches of this version (job) of a document were written."""
        if not self._has_ledger():
            return 0
        where = (
            f"collection = {_quote(collection)} AND document_id = {_quote(document_id)}"
            f" AND job_id = {_quote(job_id)}"
        )
        # Distinct batch indexes, not rows: a batch written before its key named the index
        # (an upgrade with a version in flight) and redelivered after has two rows.
        rows = self._ledger().search().where(where).select(["batch_index"]).limit(None).to_list()
        return len({int(r["batch_index"]) for r in rows})

    @_reopens_dropped
    def publish_version(self, collection: str, document_id: str, job_id: str) -> None:
        """Make a complete version's pending chunks searchable, then drop every other version
        of the document (chunks and ledger rows)."""
        table = self._table(collection)
        if table is None:
            return
        document = f"document_id = {_quote(document_id)}"
        pending = f"{document} AND job_id = {_quote(job_id)} AND NOT live"
        others = f"{document} AND job_id != {_quote(job_id)}"
        # An update or a delete is a new table version even when it matches nothing: skip
        # the common case (a single batch, written live, replacing nothing).
        published = False
        with self._write_lock, self._full_disk_is_transient(collection):
            # New live before old gone: a crash between the two leaves both searchable, and
            # the redelivered batch that brings the stage back here removes the old one.
            if table.count_rows(pending):
                table.update(where=pending, values={"live": True})
                published = True
            if table.count_rows(others):
                table.delete(others)
                self._forget_batches(collection, others)
        if published:
            # An update rewrites rows: like a write, it looks for a tombstone once committed.
            self._undo_if_deleted(collection, {document_id})

    @_reopens_dropped
    def delete_document(self, collection: str, document_id: str) -> None:
        """Drop every chunk of a document for good: its tombstone first, then its chunks."""
        key = f"{collection}/{document_id}"
        tombstone = {"key": key, "collection": collection, "document_id": document_id}
        where = f"document_id = {_quote(document_id)}"
        with self._write_lock, self._full_disk_is_transient(collection):
            # The tombstone is committed before the chunks are looked for: a write that
            # missed it committed its chunks before this, and the delete below finds them.
            # (Deleting again adds no version: a tombstone is never removed.)
            if not self._deleted(collection, {document_id}):
                tombstones = self._tombstones()
                _merge(tombstones, "key", pa.Table.from_pylist([tombstone], tombstones.schema))
            table = self._table(collection)
            if table is not None:
                table.delete(where)
            self._forget_batches(collection, where)

    def _forget_batches(self, collection: str, where: str) -> None:
        """Drop the ledger rows of versions whose chunks were just removed."""
        if self._has_ledger():
            self._ledger().delete(f"collection = {_quote(collection)} AND {where}")

    @_reopens_dropped
    def chunk_ids(
        self, collection: str, document_id: str, *, searchable_only: bool = False
    ) -> list[str]:
        """The id of every stored chunk of a document (duplicates included, if any), pending
        ones too unless `searchable_only`."""
        table = self._table(collection)
        if table is None:
            return []
        where = f"document_id = {_quote(document_id)}" + (" AND live" if searchable_only else "")
        rows = table.search().where(where).select(["chunk_id"]).limit(None).to_list()
        return [str(r["chunk_id"]) for r in rows]

    @_reopens_dropped
    def chunk_count(self, collection: str) -> int:
        """How many searchable chunks an index name holds (pending ones are not counted)."""
        table = self._table(collection)
        return 0 if table is None else int(table.count_rows("live"))

    def drop_collection(self, collection: str) -> None:
        """Drop an index name's table, then its rows in the ledger and the tombstones."""
        where = f"collection = {_quote(collection)}"
        with self._write_lock, self._full_disk_is_transient(collection):
            self._tables.pop(f"chunks_{collection}", None)
            self._writes.pop(collection, None)
            try:
                self.db.drop_table(f"chunks_{collection}")
            except ValueError as exc:
                if "was not found" not in str(exc):
                    raise
            # Chunks first: a drop cut short leaves rows that say nothing of chunks still
            # there, and dropping again removes them.
            for shared, opened in ((_LEDGER, self._ledger), (_TOMBSTONES, self._tombstones)):
                if self._has_table(shared) and opened().count_rows(where):
                    opened().delete(where)

    @_reopens_dropped
    def search(self, collection: str, vector: Sequence[float], k: int) -> list[IndexHit]:
        """The `k` live chunks nearest to `vector`, best first (score is cosine similarity)."""
        table = self._table(collection)
        if table is None:
            return []
        # A prefilter (LanceDB's default): k live hits, not the live ones among k.
        rows = (
            table.search(list(vector))
            .distance_type("cosine")
            .where("live", prefilter=True)
            .limit(k)
            .to_list()
        )
        return [
            IndexHit(
                document_id=r["document_id"],
                filename=r["filename"],
                chunk_id=r["chunk_id"],
                chunk_index=r["chunk_index"],
                page=r["page"],
                text=r["text"],
                score=round(1.0 - float(r["_distance"]), 6),
                keywords=tuple(r["keywords"]) if r.get("keywords") is not None else None,
            )
            for r in rows
        ]


def _ledger_key(collection: str, b: EmbeddedBatch) -> str:
    """A batch's row in the shared ledger: one per index name, document, job and batch."""
    # The index name in front: a job may write one document's batches to two generations of
    # a collection, and they are two rows. (Rows written before have no name in front.)
    return f"{collection}/{b.document_id}/{b.job_id}/{b.batch_index}"


def _quoted(values: set[str]) -> str:
    """An SQL list of quoted strings, in a stable order."""
    return ", ".join(_quote(v) for v in sorted(values))


def _chunk_rows(
    schema: pa.Schema, batches: Sequence[EmbeddedBatch], live: set[Version]
) -> pa.Table:
    """The chunks of `batches` as the rows of a chunks table: column by column, the vectors
    straight from the batches' float32 matrices into one fixed-size list column."""
    # A redelivered batch can share a write with its original: merge_insert matches against
    # the table, not within its own input, so one write must hold each id once (the last).
    picked: dict[str, tuple[EmbeddedBatch, int, int]] = {}
    row = 0
    for b in batches:
        for i, c in enumerate(b.chunks):
            picked[c.chunk_id] = (b, i, row)
            row += 1
    chosen = list(picked.values())
    chunks = [b.chunks[i] for b, i, _ in chosen]
    matrix = np.concatenate([b.matrix for b in batches if b.chunks])
    if len(chosen) < len(matrix):
        matrix = matrix[[r for _, _, r in chosen]]
    columns: dict[str, Any] = {
        "chunk_id": [c.chunk_id for c in chunks],
        "document_id": [b.document_id for b, _, _ in chosen],
        "job_id": [b.job_id for b, _, _ in chosen],
        "filename": [b.filename for b, _, _ in chosen],
        "chunk_index": [c.chunk_index for c in chunks],
        "page": [c.page for c in chunks],
        "heading": [c.heading for c in chunks],
        "text": [c.text for c in chunks],
        "keywords": [c.keywords for c in chunks],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]),
        "live": [(b.document_id, b.job_id) in live for b, _, _ in chosen],
    }
    return pa.Table.from_pydict(columns, schema=schema)


def _merge(table: Any, key: str, data: pa.Table) -> None:
    """Insert or replace the rows of `data` by `key`, in one table version."""
    table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(data)


def _opened(db: Any, name: str) -> Any | None:
    """A listed table, opened; None if it is no table yet: a create a full disk cut short
    leaves a directory LanceDB lists but cannot open (creating it again works)."""
    try:
        return _upgraded(db.open_table(name))
    except ValueError as exc:
        if "was not found" not in str(exc):
            raise
        return None


def _upgraded(table: Any) -> Any:
    """A table written by an older Sluice gets the columns added since: no keywords, and
    every chunk live (what it was then: searchable)."""
    if "keywords" not in table.schema.names:
        table.add_columns(pa.field("keywords", pa.list_(pa.string())))
    if "live" not in table.schema.names:
        table.add_columns({"live": "true"})
    return table
