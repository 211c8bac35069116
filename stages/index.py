"""Index: embedded batches → LanceDB, upserted by chunk id.

When the last chunk of a new version is in, the previous version's chunks are removed, so a
replaced document is searchable without a gap and never twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts.messages import EmbeddedBatch, Message
from contracts.settings import Settings
from stages.backends.vectors import LanceIndex, VectorIndex
from stages.stage import Stage


@dataclass(frozen=True)
class IndexContext:
    """What the index stage needs: the vector index."""

    index: VectorIndex


async def startup(settings: Settings) -> IndexContext:
    """Open the LanceDB directory."""
    return IndexContext(LanceIndex(settings.index_dir))


def write(index: VectorIndex, msg: EmbeddedBatch) -> None:
    """Upsert one batch; once the whole version is in, drop older versions' chunks."""
    index.upsert(msg.collection, msg.document_id, msg.job_id, msg.filename, msg.chunks)
    if index.count(msg.collection, msg.document_id, msg.job_id) >= msg.chunks_total:
        index.remove_other_versions(msg.collection, msg.document_id, msg.job_id)


async def handle(msg: EmbeddedBatch, ctx: IndexContext) -> list[Message]:
    """Write a batch to the index; the runtime reports it, the tracker counts batches."""
    await asyncio.to_thread(write, ctx.index, msg)
    return []


STAGE = Stage(name="index", startup=startup, handle=handle)
