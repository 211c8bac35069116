"""Chunk: parsed sections → token-bounded chunks with page and heading, in batches.

Chunks are measured with the embedding model's own tokenizer, so none is truncated by the model.
A big document becomes many `ChunkBatch` messages so several embed and index workers share it.
A message's index profile (a reindex's, or the collection's) may name other chunk sizes and
another model: it is chunked with those, measured with that model's tokenizer.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contracts import pipeline
from contracts.errors import Permanent, Transient
from contracts.generations import chunk_sizes
from contracts.messages import (
    Chunk,
    ChunkBatch,
    DocumentParsed,
    IndexProfile,
    ParsedDocument,
    chunk_id,
)
from contracts.settings import SPECIAL_TOKENS, Settings
from stages.backends.embedder import max_seq_length
from stages.backends.factory import open_blob_store, resolve_model_dir
from stages.backends.protocols import BlobStore
from stages.kit.deletions import Deletions
from stages.kit.token_splitter import TokenSplitter
from stages.stage import Stage

if TYPE_CHECKING:
    pass


class Splitters:
    """A splitter per (model, max tokens, overlap tokens), built on first use and kept: one
    loads a tokenizer, far too slow to do per document."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._built: dict[tuple[Path, int, int], TokenSplitter] = {}
        self._lock = threading.Lock()

    def for_profile(self, profile: IndexProfile | None) -> TokenSplitter:
        """The splitter for a message's profile (None: the deployment's chunk settings);
        Permanent `invalid_profile` or `unknown_model` for a profile that cannot be used."""
        sizes = chunk_sizes(self.settings, profile)
        model_dir = resolve_model_dir(self.settings, profile.model if profile else None)
        key = (model_dir, sizes.max_tokens, sizes.overlap_tokens)
        splitter = self._built.get(key)
        if splitter is None:
            with self._lock:
                if key not in self._built:
                    if profile is not None:
                        _check_fits(model_dir, sizes.max_tokens)
                    self._built[key] = make_splitter(*key)
                splitter = self._built[key]
        return splitter


def _check_fits(model_dir: Path, max_tokens: int) -> None:
    """Refuse a profile whose chunks are longer than its model reads: their ends would never
    be embedded, and so never found."""
    if not (model_dir / "config.json").is_file():
        return  # no config to read the limit from; the model truncates as it always does
    longest = max_seq_length(model_dir)
    if max_tokens > longest:
        raise Permanent(
            f"the index profile's chunks of {max_tokens} tokens are longer than the model in "
            f"{model_dir} reads ({longest} tokens): lower chunk_max_tokens to {longest} or less",
            code="invalid_profile",
        )


@dataclass(frozen=True)
class ChunkContext:
    """What the chunk stage needs: the blob store, its splitters, the batch size, and how to
    tell that a document was deleted."""

    blobs: BlobStore
    splitters: Splitters
    chunks_per_message: int
    deletions: Deletions


def make_splitter(model_dir: Path, max_tokens: int, overlap_tokens: int) -> TokenSplitter:
    """A text splitter that measures with the model's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # The packaged tokenizer pads and truncates to 128; chunk sizes must reflect the full text.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # Settings refuse an overlap over half a chunk, so nothing is clamped here.
    return TokenSplitter(tokenizer, max_tokens - SPECIAL_TOKENS, overlap_tokens)


async def startup(settings: Settings) -> ChunkContext:
    """Load the deployment's tokenizer (others on first use) and open the blob store."""
    splitters = Splitters(settings)
    splitters.for_profile(None)
    return ChunkContext(
        open_blob_store(settings), splitters, settings.chunks_per_message, Deletions(settings)
    )


def split(
    parsed: ParsedDocument, splitter: TokenSplitter
) -> list[tuple[str, int | None, str | None]]:
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
    # In a thread: a profile's first document loads its tokenizer.
    splitter = await asyncio.to_thread(ctx.splitters.for_profile, msg.profile)
    pieces = await asyncio.to_thread(split, parsed, splitter)
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
