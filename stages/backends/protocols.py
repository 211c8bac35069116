"""The backend seams: what a blob store, a vector index and an embedder offer.

Callers use only what these Protocols declare, and get an implementation from the factories
in stages/backends/factory.py, chosen by settings. A second implementation (an object store,
a vector database) plugs in behind the same names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from contracts.messages import EmbeddedBatch

# A note's name: a short token, never a path.
NOTE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,199}$"


def check_note_name(name: str) -> str:
    """`name` if it can name a note; `ValueError` otherwise."""
    if not re.fullmatch(NOTE_NAME_PATTERN, name) or ".." in name:
        raise ValueError(f"not a note name: {name!r}")
    return name


class BlobStore(Protocol):
    """Where large payloads live so messages only carry their sha256 (claim-check).

    Blobs go in as bytes or as a finished temporary file and come out as bytes or as a
    temporary local file, so an object store can stand behind the same calls.
    """

    def put_bytes(self, data: bytes) -> str:
        """Store bytes, return their sha256; storing the same bytes twice is a no-op."""
        ...

    def adopt(self, staged: Path, sha256: str) -> None:
        """Take a fully written temporary file into the store under its sha256 (consumes it)."""
        ...

    def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes; `Transient` if it is missing (another node may still write it)."""
        ...

    def as_file(self, sha256: str) -> AbstractContextManager[Path]:
        """A local file holding the blob, for as long as the `with` block lasts."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        ...

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        ...

    # Notes: small blobs under a name the writer chooses, for work that several workers
    # share (the page ranges of a scan read with OCR); written whole or not at all.
    def put_note(self, name: str, data: bytes) -> None:
        """Store `data` under `name` (`NOTE_NAME_PATTERN`), replacing what was there."""
        ...

    def read_note(self, name: str) -> bytes | None:
        """The note's bytes, or None if there is none."""
        ...

    def delete_note(self, name: str) -> None:
        """Remove a note if present."""
        ...

    def delete_notes(self, prefix: str) -> None:
        """Remove every note whose name starts with `prefix` (a note name's start)."""
        ...


@dataclass(frozen=True)
class IndexHit:
    """One stored chunk near a query vector, as the index returns it."""

    document_id: str
    filename: str
    chunk_id: str
    chunk_index: int
    page: int | None
    text: str
    score: float
    keywords: tuple[str, ...] | None = None


class VectorIndex(Protocol):
    """Stores chunk vectors per collection and finds the nearest ones.

    Every `collection` argument is an index name: a collection's generation 0 is the
    collection's own name, a reindex's generation n is `<collection>.g<n>`
    (contracts/generations.py). Each is an index of its own, which nothing done to another
    touches; the vectors of two may have different dimensions (two embedding models).

    A document version (job) is complete in the index when every one of its batches has
    been written (`batches_done`), whatever a stage did to the number of chunks per batch.
    Until then its chunks are pending: stored, so a retried batch can still complete the
    version, but not searchable, so a version that fails half way is never half found.
    `publish_version` makes a complete version searchable and drops the older ones; chunks
    written before this distinction existed count as searchable.

    A delete wins: `delete_document` leaves a durable tombstone, and no batch of the document
    written before, during or after it is left stored, whichever process writes it and in
    whatever order the two meet (tests/unit/test_index_contract.py holds both backends to it).
    """

    def upsert(self, collection: str, batches: Sequence[EmbeddedBatch]) -> None:
        """Insert or replace the chunks of several batches by chunk id, in one write, and
        record each batch as arrived (an empty batch too); batches of a deleted document are
        dropped: neither stored nor recorded. Chunks of a version this write completes (one
        of a single batch, or its last batches) are stored searchable, others pending."""
        ...

    def batches_done(self, collection: str, document_id: str, job_id: str) -> int:
        """How many distinct batches of this version (job) of a document were written."""
        ...

    def publish_version(self, collection: str, document_id: str, job_id: str) -> None:
        """Make the pending chunks of a complete version (job) of a document searchable, then
        drop the chunks and ledger rows of every other version of it (a replaced one): a
        search finds the old version until the new one is whole, never neither."""
        ...

    def delete_document(self, collection: str, document_id: str) -> None:
        """Drop every chunk of a document for good: its tombstone stays, so batches of it that
        are still on their way are dropped too (deleting again is harmless)."""
        ...

    def is_deleted(self, collection: str, document_id: str) -> bool:
        """Whether the document was deleted (it has a tombstone)."""
        ...

    def search(self, collection: str, vector: Sequence[float], k: int) -> list[IndexHit]:
        """The `k` searchable chunks nearest to `vector`, best first (score: cosine
        similarity); pending chunks are never among them."""
        ...

    def chunk_ids(
        self, collection: str, document_id: str, *, searchable_only: bool = False
    ) -> list[str]:
        """The id of every stored chunk of a document (duplicates included, if any), pending
        ones too unless `searchable_only`."""
        ...

    def chunk_count(self, collection: str) -> int:
        """How many searchable chunks an index name holds (pending ones are not counted)."""
        ...

    def drop_collection(self, collection: str) -> None:
        """Remove everything an index name holds, for good: its chunks, its ledger rows and
        its tombstones (a generation no longer served). Dropping one not there is harmless;
        a write to the name after the drop starts it anew."""
        ...


class Embedder(Protocol):
    """Turns texts into normalised vectors."""

    dimensions: int

    def embed(self, texts: Sequence[str]) -> list[list[float]] | npt.NDArray[np.float32]:
        """One unit-length vector per text, in order: lists, or a (texts, dimensions) float32
        matrix (cheaper: the embed stage packs it as it is)."""
        ...


def embedding_text(heading: str | None, text: str) -> str:
    """What the model sees: the heading gives a chunk the context its own words may lack.

    Queries go through the same function (with no heading), so both sides match.
    """
    return f"{heading}\n{text}" if heading and heading not in text else text
