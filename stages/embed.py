"""Embed: chunk batches → normalised vectors (all-MiniLM-L6-v2 in-process, or an endpoint)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts.messages import ChunkBatch, EmbeddedBatch, EmbeddedChunk
from contracts.settings import Settings
from stages import metrics
from stages.backends.embedder import Embedder, make_embedder
from stages.stage import Stage


@dataclass(frozen=True)
class EmbedContext:
    """What the embed stage needs: the embedder, built once."""

    embedder: Embedder


async def startup(settings: Settings) -> EmbedContext:
    """Build the embedder the settings choose (loading a local model takes a while)."""
    return EmbedContext(await asyncio.to_thread(make_embedder, settings))


def embedding_text(heading: str | None, text: str) -> str:
    """What the model sees: the heading gives a chunk the context its own words may lack."""
    return f"{heading}\n{text}" if heading and heading not in text else text


async def handle(msg: ChunkBatch, ctx: EmbedContext) -> list[EmbeddedBatch]:
    """Embed every chunk of a batch in one model call."""
    texts = [embedding_text(c.heading, c.text) for c in msg.chunks]
    metrics.EMBED_BATCH_SIZE.observe(len(texts))
    vectors = await asyncio.to_thread(ctx.embedder.embed, texts)
    chunks = [
        EmbeddedChunk(**c.model_dump(), vector=v) for c, v in zip(msg.chunks, vectors, strict=True)
    ]
    return [
        EmbeddedBatch(
            **msg.envelope(),
            batch_index=msg.batch_index,
            batch_count=msg.batch_count,
            chunks_total=msg.chunks_total,
            chunks=chunks,
        )
    ]


STAGE = Stage(name="embed", startup=startup, handle=handle)
