"""Embed: chunk batches → normalised vectors (all-MiniLM-L6-v2 in-process, or an endpoint)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts import pipeline
from contracts.messages import ChunkBatch, EmbeddedBatch, EmbeddedChunk
from contracts.routing import INTERACTIVE
from contracts.settings import Settings
from stages.backends.factory import make_embedder
from stages.backends.protocols import Embedder, embedding_text
from stages.infra import stage_metrics as metrics
from stages.kit.batching import Coalescer
from stages.stage import Stage


@dataclass(frozen=True)
class EmbedContext:
    """What the embed stage needs: the embedder, built once, and its shared model calls."""

    embedder: Embedder
    calls: Coalescer[str, list[float]]
    # Interactive chunks go into the next model call first (off with SLUICE_LANES=false).
    lanes: bool = True


def context_for(
    embedder: Embedder,
    *,
    max_items: int,
    max_wait_s: float,
    lanes: bool = True,
    slice_items: int | None = None,
) -> EmbedContext:
    """An embed context whose concurrent messages share model calls of up to `max_items`,
    run in slices of `slice_items` texts of similar lengths when lanes are on, so
    interactive chunks wait for one slice of a bulk call at most."""

    def embed(texts: list[str]) -> list[list[float]]:
        metrics.EMBED_BATCH_SIZE.observe(len(texts))
        return embedder.embed(texts)

    calls = Coalescer(
        embed,
        max_items=max_items,
        max_wait_s=max_wait_s,
        name="embed",
        slice_items=slice_items if lanes else None,
        size_of=len,
    )
    return EmbedContext(embedder, calls, lanes)


async def startup(settings: Settings) -> EmbedContext:
    """Build the embedder the settings choose (loading a local model takes a while)."""
    embedder = await asyncio.to_thread(make_embedder, settings)
    return context_for(
        embedder,
        max_items=settings.embed_call_chunks,
        max_wait_s=settings.embed_batch_wait_s,
        lanes=settings.lanes,
        slice_items=settings.embed_slice_chunks,
    )


async def handle(msg: ChunkBatch, ctx: EmbedContext) -> list[EmbeddedBatch]:
    """Embed every chunk of a batch, in a model call shared with other documents' batches."""
    texts = [embedding_text(c.heading, c.text) for c in msg.chunks]
    # A stage before this one may have emptied the batch: it still goes on to the index,
    # which counts it towards the document's completion.
    urgent = ctx.lanes and msg.priority == INTERACTIVE
    vectors = await ctx.calls.submit(texts, urgent=urgent) if texts else []
    chunks = [
        EmbeddedChunk(**c.model_dump(), vector=v) for c, v in zip(msg.chunks, vectors, strict=True)
    ]
    return [
        EmbeddedBatch(
            **msg.envelope(),
            batch_index=msg.batch_index,
            batch_count=msg.batch_count,
            chunks_total=msg.chunks_total,
            language=msg.language,
            chunks=chunks,
        )
    ]


STAGE = Stage(spec=pipeline.EMBED, startup=startup, handle=handle)
