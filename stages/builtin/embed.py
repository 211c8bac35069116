"""Embed: chunk batches → normalised vectors (all-MiniLM-L6-v2 in-process, or an endpoint).

A message whose index profile names another model (a reindex's new generation) is embedded
with that one, loaded the first time a message needs it and kept for the process. Messages of
every model share the stage's model calls, and a call embeds each model's texts apart.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from contracts import pipeline
from contracts.messages import ChunkBatch, EmbeddedBatch, PackedVectors
from contracts.routing import INTERACTIVE
from contracts.settings import Settings
from stages.backends.factory import embedder_for, is_default_model, make_embedder
from stages.backends.protocols import Embedder, embedding_text
from stages.infra import stage_metrics as metrics
from stages.kit.batching import Coalescer
from stages.stage import Stage

# What one model call takes: a text and the embedder that must embed it.
Item = tuple[Embedder, str]
# What it gives back for one text: its vector, a row of the call's float32 matrix.
Vector = npt.NDArray[np.float32]


class Models:
    """The embedders of the models messages name: the stage's own, and the others, each
    loaded when a message first names it."""

    def __init__(self, default: Embedder, settings: Settings | None = None) -> None:
        self.default = default
        self._settings = settings
        self._named: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def get(self, model: str | None) -> Embedder:
        """The embedder of `model` (None: the stage's own); Permanent `unknown_model` if there
        is no such model. Slow the first time a model is named: call it in a thread."""
        if model is None:
            return self.default
        found = self._named.get(model)
        if found is not None:
            return found
        with self._lock:
            if model not in self._named:
                # Built lazily: contexts made for tests name no settings and no model.
                settings = self._settings or Settings()
                self._named[model] = (
                    self.default
                    if is_default_model(settings, model)
                    else embedder_for(settings, model)
                )
            return self._named[model]


@dataclass(frozen=True)
class EmbedContext:
    """What the embed stage needs: the embedders, built when needed, and the model calls
    they share."""

    embedder: Embedder
    calls: Coalescer[Item, Vector]
    models: Models
    # Interactive chunks go into the next model call first (off with SLUICE_LANES=false).
    lanes: bool = True


def embed_by_model(items: list[Item]) -> list[Vector]:
    """The vectors of a call's texts, in order, each model embedding only its own texts."""
    positions: dict[int, list[int]] = {}
    for i, (embedder, _) in enumerate(items):
        positions.setdefault(id(embedder), []).append(i)
    vectors: list[Vector] = [np.empty(0, np.float32) for _ in items]
    for chosen in positions.values():
        embedder = items[chosen[0]][0]
        metrics.EMBED_BATCH_SIZE.observe(len(chosen))
        # An embedder may answer lists or a matrix: float32 from here on, as it is packed.
        answered = np.asarray(embedder.embed([items[i][1] for i in chosen]), dtype=np.float32)
        for i, vector in zip(chosen, answered, strict=True):
            vectors[i] = vector
    return vectors


def context_for(
    embedder: Embedder,
    *,
    max_items: int,
    max_wait_s: float,
    lanes: bool = True,
    slice_items: int | None = None,
    settings: Settings | None = None,
) -> EmbedContext:
    """An embed context whose concurrent messages share model calls of up to `max_items`,
    run in slices of `slice_items` texts of similar lengths when lanes are on, so
    interactive chunks wait for one slice of a bulk call at most; models other than
    `embedder` are found with `settings`."""
    calls: Coalescer[Item, Vector] = Coalescer(
        embed_by_model,
        max_items=max_items,
        max_wait_s=max_wait_s,
        name="embed",
        slice_items=slice_items if lanes else None,
        size_of=lambda item: len(item[1]),
    )
    return EmbedContext(embedder, calls, Models(embedder, settings), lanes)


async def startup(settings: Settings) -> EmbedContext:
    """Build the embedder the settings choose (loading a local model takes a while)."""
    embedder = await asyncio.to_thread(make_embedder, settings)
    return context_for(
        embedder,
        max_items=settings.embed_call_chunks,
        max_wait_s=settings.embed_batch_wait_s,
        lanes=settings.lanes,
        slice_items=settings.embed_slice_chunks,
        settings=settings,
    )


async def handle(msg: ChunkBatch, ctx: EmbedContext) -> list[EmbeddedBatch]:
    """Embed every chunk of a batch with its profile's model, in a model call shared with
    other documents' batches."""
    texts = [embedding_text(c.heading, c.text) for c in msg.chunks]
    model = msg.profile.model if msg.profile else None
    # In a thread: the first message naming a model loads it (seconds), and the others'
    # model calls go on meanwhile.
    embedder = (
        ctx.models.default if model is None else await asyncio.to_thread(ctx.models.get, model)
    )
    # A stage before this one may have emptied the batch: it still goes on to the index,
    # which counts it towards the document's completion.
    urgent = ctx.lanes and msg.priority == INTERACTIVE
    items = [(embedder, text) for text in texts]
    vectors = await ctx.calls.submit(items, urgent=urgent) if items else []
    # Packed once: the index reads the matrix back with no float parsed one by one.
    packed = PackedVectors.pack(np.stack(vectors) if vectors else [], embedder.dimensions)
    return [
        EmbeddedBatch(
            **msg.envelope(),
            batch_index=msg.batch_index,
            batch_count=msg.batch_count,
            chunks_total=msg.chunks_total,
            language=msg.language,
            chunks=msg.chunks,
            vectors=packed,
        )
    ]


STAGE = Stage(spec=pipeline.EMBED, startup=startup, handle=handle)
