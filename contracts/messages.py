"""The messages that ride the `doc.*` data plane, one model per hop, with a schema version.

Large payloads never ride the broker: raw uploads and parsed text live in the blob store and
messages carry their sha256 (claim-check). Chunk batches and their vectors ride inline; an
embedded batch's vectors as one packed float32 matrix in base64 (`PackedVectors`), since its
version 2: vectors as JSON lists of floats (version 1) are still read, and converted.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from contracts.routing import INTERACTIVE, Lane

SCHEMA_VERSION: Literal[1] = 1
# A stage's name: the built-in ones or a plug-in's (contracts/pipeline.py declares them).
StageName = str
COLLECTION_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Every field is checked on the way in, whoever signed the message: what a consumer reads
# ends up in paths (blob names), queries and the job store.
# Job and document ids: the gateway makes 32 hex digits (`uuid4().hex`; a new version of a
# document keeps its id). Accepted: any short token of a-z, 0-9, `_` and `-`, so an id is
# never a path, a quote or a wildcard, and test doubles may name jobs `j1`.
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# A blob's name in the blob store: the sha256 of its bytes, in lowercase hex.
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
# The chunk stage's chunk ids are 32 hex digits (`chunk_id` below); a plug-in stage may add
# chunks with ids of its own, so any short token of letters, digits and `._:-`.
ChunkId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
# What the gateway keeps of a client's filename (gateway/http/uploads.py `display_name`).
FILENAME_MAX_CHARS = 255
# Bounds far beyond any real document (pages, chunks, batches), so no count is absurd.
MAX_COUNT = 10_000_000
MAX_UPLOAD_SIZE_BYTES = 2**40
# A media type as the gateway names one (contracts/media.py), parameters and all.
MEDIA_TYPE_PATTERN = r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+=; -]{0,254}$"
# One end of one job: `<job_id>.<round>` (gateway/http/webhook_dispatch.py).
DELIVERY_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}\.[0-9]{1,9}$"


class IndexProfile(BaseModel):
    """How one generation of a collection is built: its chunk sizes and its embedding model.

    A field left out (None) means the deployment's setting (`SLUICE_CHUNK_MAX_TOKENS`,
    `SLUICE_CHUNK_OVERLAP_TOKENS`, the packaged model); a reindex names what it changes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_max_tokens: int | None = Field(None, ge=16, le=8192)
    chunk_overlap_tokens: int | None = Field(None, ge=0, le=4096)
    # The packaged model's name, or a sentence-transformers directory on the stage's host.
    model: str | None = Field(None, min_length=1, max_length=1024)


class Message(BaseModel):
    """What every data-plane message carries: who it belongs to and its schema version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    job_id: Id
    document_id: Id
    collection: str = Field(pattern=COLLECTION_PATTERN)
    filename: str = Field(min_length=1, max_length=FILENAME_MAX_CHARS)
    # The lane the job's work travels in, at every stage (contracts/routing.py).
    priority: Lane = INTERACTIVE
    # The generation of the collection's index this work builds (contracts/generations.py):
    # 0 until a collection is first re-indexed; a reindex builds the next one beside it.
    generation: int = Field(0, ge=0, le=MAX_COUNT)
    # How that generation chunks and embeds; None: the deployment's settings.
    profile: IndexProfile | None = None

    def unit(self) -> tuple[int, int, int]:
        """(batch index, batch count, chunks) of this message within its document's work."""
        return (0, 1, 0)

    def envelope(self) -> dict[str, Any]:
        """The fields every message of this job carries on to the next hop."""
        return {
            "job_id": self.job_id,
            "document_id": self.document_id,
            "collection": self.collection,
            "filename": self.filename,
            "priority": self.priority,
            "generation": self.generation,
            "profile": self.profile,
        }


class PageRange(BaseModel):
    """Pages of a scanned document for one parse worker to read with OCR.

    The parse of a document whose pages lack text splits them into `count` ranges and sends
    each back to the parse queue, so several workers read a big scan at once; the worker that
    reads the last missing range puts the document together (stages/builtin/parse.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, lt=MAX_COUNT)
    count: int = Field(ge=1, le=MAX_COUNT)
    # 1-based page numbers to read, in order.
    pages: list[int] = Field(min_length=1, max_length=10_000)
    # Every page of the document, read or not.
    pages_total: int = Field(ge=1, le=MAX_COUNT)
    # Whether pages of it have a text layer: their `ParsedDocument` is a note beside the
    # ranges' (stages/builtin/parse.py).
    text_layer: bool = False

    @model_validator(mode="after")
    def _within_its_ranges(self) -> Self:
        if self.index >= self.count:
            raise ValueError(f"range index {self.index} is not below range count {self.count}")
        if any(not 1 <= page <= self.pages_total for page in self.pages):
            raise ValueError(f"a page of {self.pages} is outside 1..{self.pages_total}")
        return self


class DocumentUploaded(Message):
    """An upload accepted by the gateway; its bytes are in the blob store.

    With `ocr_range`, it is one range of a scanned document's pages to read with OCR.
    """

    blob_sha256: Sha256
    content_type: str = Field(pattern=MEDIA_TYPE_PATTERN)
    size_bytes: int = Field(ge=1, le=MAX_UPLOAD_SIZE_BYTES)
    ocr_range: PageRange | None = None

    def unit(self) -> tuple[int, int, int]:
        """The split of a scan is unit 0 of its parse, and range i is unit i + 1; the third
        figure counts pages read (the job shows them), not chunks."""
        if self.ocr_range is None:
            return (0, 1, 0)
        r = self.ocr_range
        return (r.index + 1, r.count + 1, len(r.pages))


class DocumentParsed(Message):
    """A document turned into text sections (a `ParsedDocument` in the blob store)."""

    blob_sha256: Sha256
    parsed_sha256: Sha256
    pages: int | None = Field(None, ge=0, le=MAX_COUNT)


class Chunk(BaseModel):
    """One piece of a document small enough to embed, with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_id: ChunkId
    chunk_index: int = Field(ge=0, le=MAX_COUNT)
    text: str
    page: int | None = Field(None, ge=0, le=MAX_COUNT)
    heading: str | None = None
    # Set by the optional enrich stage: the chunk's key phrases, best first.
    keywords: list[str] | None = None


# The widest vector a batch may carry: pgvector's `vector` type holds up to 16,000 dimensions,
# and no embedding model in use comes near it.
MAX_DIMENSIONS = 16_000
# How vectors are packed: float32, as both indexes store them, little-endian whatever the host.
VECTOR_DTYPE = np.dtype("<f4")


class PackedVectors(BaseModel):
    """`count` vectors of `dimensions` floats as one matrix: row i is chunk i's vector.

    Packed (base64 in the JSON body, so the body is still one signed JSON message), 64 vectors
    of 384 dimensions are 131 KB rather than 515 KB of float lists, and are read with one
    `np.frombuffer` rather than 24,576 floats parsed one by one (bench/vector_codec.py measures
    both). Checked on the way in like every field: its length, and no NaN or inf.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    count: int = Field(ge=0, le=MAX_COUNT)
    # 0 only for no vectors: an empty batch converted from version 1 names no dimension.
    dimensions: int = Field(ge=0, le=MAX_DIMENSIONS)
    # `count` by `dimensions` little-endian float32s, row by row.
    data: bytes

    @model_validator(mode="after")
    def _a_finite_matrix(self) -> Self:
        if self.count and not self.dimensions:
            raise ValueError(f"{self.count} vectors of 0 dimensions")
        expected = self.count * self.dimensions * VECTOR_DTYPE.itemsize
        if len(self.data) != expected:
            raise ValueError(
                f"{len(self.data)} bytes of vectors, where {self.count} vectors of "
                f"{self.dimensions} float32s take {expected}"
            )
        finite = np.isfinite(self.matrix).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)[:10].tolist()
            raise ValueError(f"vectors {rows} (row numbers) hold NaN or infinite values")
        return self

    @property
    def matrix(self) -> npt.NDArray[np.float32]:
        """The vectors as a read-only (count, dimensions) float32 array."""
        # A view of `data`, not a copy: a microsecond however many vectors, so not cached
        # (a cached array would make the model's equality ambiguous).
        return np.frombuffer(self.data, dtype=VECTOR_DTYPE).reshape(self.count, self.dimensions)

    @classmethod
    def pack(cls, vectors: npt.ArrayLike, dimensions: int | None = None) -> PackedVectors:
        """Pack a (count, dimensions) matrix, or a list of equally long vectors; `dimensions`
        names the width of an empty one."""
        # A value beyond float32's range becomes inf, which validation refuses.
        with np.errstate(over="ignore"):
            matrix = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
        if matrix.size == 0:
            matrix = matrix.reshape(0, dimensions or 0)
        if matrix.ndim != 2:
            raise ValueError(f"vectors must be a matrix, not an array of shape {matrix.shape}")
        count, width = matrix.shape
        return cls(count=count, dimensions=width, data=matrix.tobytes())


# What a version 1 batch's vectors were: a list of floats per chunk.
_V1_VECTORS: TypeAdapter[list[list[float]]] = TypeAdapter(list[list[float]])


class _Batch(Message):
    """One of `batch_count` batches of a document's chunks.

    Stages between chunk and index hand on one batch per batch with the same index and
    count, so the index knows a document is whole when every batch index has reached it,
    whatever a stage did to the chunks inside (a batch may even end up empty).
    `chunks_total` is what the chunk stage made, for progress; it is not a completion count.
    """

    batch_index: int = Field(ge=0, lt=MAX_COUNT)
    batch_count: int = Field(ge=1, le=MAX_COUNT)
    chunks_total: int = Field(ge=1, le=MAX_COUNT)
    # The document's language (ISO 639-1), once the optional enrich stage detected it.
    language: str | None = Field(None, pattern=r"^[a-z]{2,3}$")

    @model_validator(mode="after")
    def _within_its_batches(self) -> Self:
        if self.batch_index >= self.batch_count:
            raise ValueError(
                f"batch_index {self.batch_index} is not below batch_count {self.batch_count}"
            )
        return self

    def unit(self) -> tuple[int, int, int]:
        """(batch index, batch count, chunks) of this message within its document's work."""
        return (self.batch_index, self.batch_count, len(self.chunks))  # type: ignore[attr-defined]


class ChunkBatch(_Batch):
    """Up to `chunks_per_message` chunks of one document, so many workers share a big one."""

    chunks: list[Chunk]


class EmbeddedBatch(_Batch):
    """A chunk batch with a vector per chunk, packed: row i of `vectors` is `chunks[i]`'s.

    Version 2. A version 1 body (each chunk with its `vector` list: queued by an older
    release, or replayed from a dead-letter queue) is read as the same batch, converted.
    """

    # Only this message moved to version 2; the others stay at `SCHEMA_VERSION`.
    version: Literal[2] = 2  # type: ignore[assignment]
    chunks: list[Chunk]
    vectors: PackedVectors

    @model_validator(mode="before")
    @classmethod
    def _from_version_1(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("version") != 1:
            return data
        chunks = data.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and "vector" in c for c in chunks
        ):
            raise ValueError("a version 1 embedded batch needs a `vector` in every chunk")
        vectors = _V1_VECTORS.validate_python([c["vector"] for c in chunks])
        if len({len(v) for v in vectors}) > 1:
            raise ValueError("the vectors of a version 1 embedded batch differ in length")
        return {
            **data,
            "version": 2,
            "chunks": [{k: v for k, v in c.items() if k != "vector"} for c in chunks],
            "vectors": PackedVectors.pack(vectors),
        }

    @model_validator(mode="after")
    def _one_vector_per_chunk(self) -> Self:
        if self.vectors.count != len(self.chunks):
            raise ValueError(f"{self.vectors.count} vectors for {len(self.chunks)} chunks")
        return self

    @property
    def matrix(self) -> npt.NDArray[np.float32]:
        """The batch's vectors, one row per chunk, read-only float32."""
        return self.vectors.matrix


class WebhookRequest(Message):
    """A finished job's JSON to POST to the `callback_url` its upload named (the webhook
    stage signs and sends it; the tracker publishes it when the job ends)."""

    callback_url: str = Field(max_length=2048)
    # The job as `GET /v1/jobs/{id}` answered when it ended.
    job: dict[str, object]
    # Which end of the job this is (a retried job ends again): receivers dedupe on it.
    delivery_id: str = Field(pattern=DELIVERY_ID_PATTERN)


class Section(BaseModel):
    """A run of text with the page and heading it sits under."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    page: int | None = None
    heading: str | None = None


class ParsedDocument(BaseModel):
    """What the parse stage stores in the blob store for the chunk stage to read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    content_type: str
    pages: int | None = None
    sections: list[Section]


def chunk_id(document_id: str, blob_sha256: Sha256, chunk_index: int) -> str:
    """A chunk's id: the same document bytes always give the same ids, so redelivery upserts."""
    digest = hashlib.sha256(f"{document_id}\x00{blob_sha256}\x00{chunk_index}".encode())
    return digest.hexdigest()[:32]
