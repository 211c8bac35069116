"""Index: embedded batches → the vector index, upserted by chunk id.

A version's chunks are stored pending (not searchable) until every batch of it is in; then
the version is published: its chunks become searchable and the previous version's are
removed, so a replaced document is searchable without a gap, and a version that fails half
way (a batch dead-lettered) is never half searchable, while a retry of its failed batch can
still complete it. Completion counts batches, not chunks: a stage before this one may have
dropped or added chunks in any batch.

A delete wins: the batches of a document deleted while they were on their way are dropped by
the index itself (its tombstone, stages/backends/protocols.py `VectorIndex`), so they end
like any other batch, acked once, and neither they nor a version swap bring it back.

Each generation of a collection is an index of its own (contracts/generations.py): a batch is
written, completed and published under its generation's index name, so a reindex building
generation n leaves what search finds in the serving one untouched.

A batch's vectors arrive packed, and the backends take them as one float32 matrix per batch
(`EmbeddedBatch.matrix`, a view of the message's bytes): no float is parsed or copied one by
one between the broker and the index's own column or binary format.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts import pipeline
from contracts.errors import Transient
from contracts.generations import index_name
from contracts.messages import EmbeddedBatch, Message
from contracts.settings import Settings
from stages.backends.factory import open_index
from stages.backends.protocols import VectorIndex
from stages.infra import memory
from stages.kit.batching import Coalescer
from stages.stage import Stage


@dataclass(frozen=True)
class IndexContext:
    """What the index stage needs: the vector index, and its shared writes."""

    index: VectorIndex
    writes: Coalescer[EmbeddedBatch, None]


def context_for(index: VectorIndex, *, max_batches: int, max_wait_s: float) -> IndexContext:
    """An index context whose concurrent messages share writes of up to `max_batches`."""
    return IndexContext(
        index,
        Coalescer(
            lambda batches: write(index, batches),
            max_items=max_batches,
            max_wait_s=max_wait_s,
            name="index",
        ),
    )


async def startup(settings: Settings) -> IndexContext:
    """Open the vector index the settings choose."""
    # Freed memory kept by allocators is most of what this stage would hold: LanceDB writes
    # from a pool of threads, each with a glibc arena of its own, and Arrow's pool keeps
    # what it frees.
    memory.limit_arenas(2)
    memory.arrow_uses_malloc()
    return context_for(
        open_index(settings),
        max_batches=settings.stage("index").concurrency,
        max_wait_s=settings.embed_batch_wait_s,
    )


def write(index: VectorIndex, batches: list[EmbeddedBatch]) -> list[None]:
    """Upsert batches (one write per index name: a collection's generation); once every
    batch of a version is in, publish it (searchable, and the older versions dropped)."""
    named = [(index_name(b.collection, b.generation), b) for b in batches]
    for name in {name for name, _ in named}:
        try:
            index.upsert(name, [b for n, b in named if n == name])
        except (OSError, RuntimeError) as exc:
            # LanceDB's own message names Rust source files; say what a person can check.
            cause = str(exc).split(":", 2)[-1].split(", /")[0].strip()[:300]
            raise Transient(
                f"Could not write to the index {name!r} ({cause}). "
                "Check that the index directory under SLUICE_DATA_DIR is writable and not "
                "damaged, then retry the job.",
                code="index_unavailable",
            ) from exc
    # Per index name: a version is published within its own generation, so a reindex's new
    # version of a document never removes the serving generation's chunks of it.
    complete = {
        (name, b.document_id, b.job_id)
        for name, b in named
        if index.batches_done(name, b.document_id, b.job_id) >= b.batch_count
    }
    for name, document_id, job_id in complete:
        # Also when this write already stored the version searchable: a redelivered last
        # batch, or a crash after the write, must still see the old version removed.
        index.publish_version(name, document_id, job_id)
    return [None] * len(batches)


async def handle(msg: EmbeddedBatch, ctx: IndexContext) -> list[Message]:
    """Write a batch to the index, sharing the write with other messages in hand."""
    await ctx.writes.submit([msg])
    return []


STAGE = Stage(spec=pipeline.INDEX, startup=startup, handle=handle)
