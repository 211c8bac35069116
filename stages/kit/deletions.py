"""Whether a document was deleted, for a stage that finds one of its blobs gone.

`DELETE /v1/documents/{id}` removes a document's blobs while its messages may still be on
their way; a stage that then finds a blob missing must end that message, not retry it until
it is dead-lettered. A missing blob is `Transient` (the blob store cannot tell a deleted blob
from one another node is still writing): the vector index's tombstone tells them apart.
"""

from __future__ import annotations

import asyncio
import threading

from contracts.errors import SluiceError
from contracts.generations import index_name
from contracts.messages import Message
from contracts.settings import Settings
from stages.backends.factory import open_index
from stages.backends.protocols import VectorIndex


class Deletions:
    """The vector index's tombstones, opened the first time a stage has to ask (most never
    do: a blob goes missing only when its document was deleted)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._index: VectorIndex | None = None
        self._lock = threading.Lock()

    def _opened(self) -> VectorIndex:
        with self._lock:
            if self._index is None:
                self._index = open_index(self._settings)
            return self._index

    async def explains(self, msg: Message, error: SluiceError) -> bool:
        """Whether `error` is a blob of `msg`'s document gone because the document was
        deleted: then the stage is done with the message (there is nothing left to do)."""
        if error.code != "blob_missing":
            return False
        index = await asyncio.to_thread(self._opened)
        # The tombstone of the generation the message builds: a delete leaves one in every
        # generation of the collection there is, this one included.
        name = index_name(msg.collection, msg.generation)
        return await asyncio.to_thread(index.is_deleted, name, msg.document_id)
