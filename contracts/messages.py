"""The messages that ride the `doc.*` data plane, one model per hop, with a schema version.

Large payloads never ride the broker: raw uploads and parsed text live in the blob store and
messages carry their sha256 (claim-check). Chunk batches and their vectors ride inline.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.routing import INTERACTIVE, Lane

SCHEMA_VERSION: Literal[1] = 1
# A stage's name: the built-in ones or a plug-in's (contracts/pipeline.py declares them).
StageName = str
COLLECTION_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
Sha256 = str


class Message(BaseModel):
    """What every data-plane message carries: who it belongs to and its schema version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    job_id: str
    document_id: str
    collection: str = Field(pattern=COLLECTION_PATTERN)
    filename: str
    # The lane the job's work travels in, at every stage (contracts/routing.py).
    priority: Lane = INTERACTIVE

    def unit(self) -> tuple[int, int, int]:
        """(batch index, batch count, chunks) of this message within its document's work."""
        return (0, 1, 0)

    def envelope(self) -> dict[str, str]:
        """The fields every message of this job carries on to the next hop."""
        return {
            "job_id": self.job_id,
            "document_id": self.document_id,
            "collection": self.collection,
            "filename": self.filename,
            "priority": self.priority,
        }


class DocumentUploaded(Message):
    """An upload accepted by the gateway; its bytes are in the blob store."""

    blob_sha256: Sha256
    content_type: str
    size_bytes: int = Field(ge=1)


class DocumentParsed(Message):
    """A document turned into text sections (a `ParsedDocument` in the blob store)."""

    blob_sha256: Sha256
    parsed_sha256: Sha256
    pages: int | None = None


class Chunk(BaseModel):
    """One piece of a document small enough to embed, with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_id: str
    chunk_index: int = Field(ge=0)
    text: str
    page: int | None = None
    heading: str | None = None
    # Set by the optional enrich stage: the chunk's key phrases, best first.
    keywords: list[str] | None = None


class EmbeddedChunk(Chunk):
    """A chunk with its normalised embedding."""

    vector: list[float]


class _Batch(Message):
    """One of `batch_count` batches of a document's chunks.

    Stages between chunk and index hand on one batch per batch with the same index and
    count, so the index knows a document is whole when every batch index has reached it,
    whatever a stage did to the chunks inside (a batch may even end up empty).
    `chunks_total` is what the chunk stage made, for progress; it is not a completion count.
    """

    batch_index: int = Field(ge=0)
    batch_count: int = Field(ge=1)
    chunks_total: int = Field(ge=1)
    # The document's language (ISO 639-1), once the optional enrich stage detected it.
    language: str | None = Field(None, pattern=r"^[a-z]{2,3}$")

    def unit(self) -> tuple[int, int, int]:
        """(batch index, batch count, chunks) of this message within its document's work."""
        return (self.batch_index, self.batch_count, len(self.chunks))  # type: ignore[attr-defined]


class ChunkBatch(_Batch):
    """Up to `chunks_per_message` chunks of one document, so many workers share a big one."""

    chunks: list[Chunk]


class EmbeddedBatch(_Batch):
    """A chunk batch with a vector per chunk."""

    chunks: list[EmbeddedChunk]


class WebhookRequest(Message):
    """A finished job's JSON to POST to the `callback_url` its upload named (the webhook
    stage signs and sends it; the tracker publishes it when the job ends)."""

    callback_url: str = Field(max_length=2048)
    # The job as `GET /v1/jobs/{id}` answered when it ended.
    job: dict[str, object]
    # Which end of the job this is (a retried job ends again): receivers dedupe on it.
    delivery_id: str


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
