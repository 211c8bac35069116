"""Chunk: parsed sections → token-bounded chunks with page and heading, in batches.

Chunks are measured with the embedding model's own tokenizer, so none is truncated by the model.
A big document becomes many `ChunkBatch` messages so several embed and index workers share it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts import pipeline
from contracts.errors import Permanent, Transient
from contracts.messages import Chunk, ChunkBatch, DocumentParsed, ParsedDocument, chunk_id
from contracts.settings import SPECIAL_TOKENS, Settings
from stages.backends.embedder import packaged_model_dir
from stages.backends.factory import open_blob_store
from stages.backends.protocols import BlobStore
from stages.kit.deletions import Deletions
from stages.stage import Stage


@dataclass(frozen=True)
class ChunkContext:
    """What the chunk stage needs: the blob store, a splitter, the batch size, and how to tell
    that a document was deleted."""

    blobs: BlobStore
    splitter: Any
    chunks_per_message: int
    deletions: Deletions


def make_splitter(model_dir: Path, max_tokens: int, overlap_tokens: int) -> Any:
    """A text splitter that measures with the model's tokenizer."""
    from semantic_text_splitter import TextSplitter
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # The packaged tokenizer pads and truncates to 128; chunk sizes must reflect the full text.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # Settings refuse an overlap over half a chunk, so nothing is clamped here.
    capacity = max_tokens - SPECIAL_TOKENS
    return TextSplitter.from_huggingface_tokenizer(
        tokenizer, capacity=capacity, overlap=overlap_tokens
    )


async def startup(settings: Settings) -> ChunkContext:
    """Load the tokenizer and open the blob store."""
    splitter = make_splitter(
        settings.model_dir or packaged_model_dir(),
        settings.chunk_max_tokens,
        settings.chunk_overlap_tokens,
    )
    return ChunkContext(
        open_blob_store(settings), splitter, settings.chunks_per_message, Deletions(settings)
    )


def split(parsed: ParsedDocument, splitter: Any) -> list[tuple[str, int | None, str | None]]:
    """(text, page, heading) chunks in document order; sections under one heading split together."""
    pieces: list[tuple[str, int | None, str | None]] = []
    groups = itertools.groupby(parsed.sections, key=lambda s: (s.page, s.heading))
    for (page, heading), sections in groups:
        text = "\n\n".join(s.text.strip() for s in sections if s.text.strip())
        pieces.extend((chunk, page, heading) for chunk in splitter.chunks(text) if chunk.strip())
    return pieces


async def handle(msg: DocumentParsed, ctx: ChunkContext) -> list[ChunkBatch]:
    """Split a parsed document into chunk batches with deterministic chunk ids; a document
    deleted meanwhile (its parsed text gone with it) is dropped."""
    try:
        text = ctx.blobs.read_bytes(msg.parsed_sha256)
    except Transient as exc:
        if await ctx.deletions.explains(msg, exc):
            return []
        raise
    parsed = ParsedDocument.model_validate_json(text)
    pieces = await asyncio.to_thread(split, parsed, ctx.splitter)
    if not pieces:
        raise Permanent(
            f"{msg.filename}: no text to index after parsing; if it is a scan, OCR it first.",
            code="no_text",
        )
    chunks = [
        Chunk(
            chunk_id=chunk_id(msg.document_id, msg.blob_sha256, i),
            chunk_index=i,
            text=text,
            page=page,
            heading=heading,
        )
        for i, (text, page, heading) in enumerate(pieces)
    ]
    size = ctx.chunks_per_message
    batches = [chunks[i : i + size] for i in range(0, len(chunks), size)]
    return [
        ChunkBatch(
            **msg.envelope(),
            batch_index=n,
            batch_count=len(batches),
            chunks_total=len(chunks),
            chunks=batch,
        )
        for n, batch in enumerate(batches)
    ]


STAGE = Stage(spec=pipeline.CHUNK, startup=startup, handle=handle)
