"""Parse: sniffed bytes → text sections with page numbers, stored in the blob store."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts.messages import DocumentParsed, DocumentUploaded
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.formats import parse_document
from stages.stage import Stage


@dataclass(frozen=True)
class ParseContext:
    """What the parse stage needs: the blob store."""

    blobs: LocalBlobStore


async def startup(settings: Settings) -> ParseContext:
    """Open the blob store."""
    return ParseContext(blobs=LocalBlobStore(settings.blob_dir))


async def handle(msg: DocumentUploaded, ctx: ParseContext) -> list[DocumentParsed]:
    """Extract the text of an upload; a parser's `Permanent` (bad file) fails the job."""
    source = ctx.blobs.path(msg.blob_sha256)
    if not source.is_file():
        ctx.blobs.read_bytes(msg.blob_sha256)  # raises Transient with the path in its message
    parsed = await asyncio.to_thread(parse_document, source, msg.content_type)
    parsed_sha256 = ctx.blobs.put_bytes(parsed.model_dump_json().encode())
    return [
        DocumentParsed(
            **msg.envelope(),
            blob_sha256=msg.blob_sha256,
            parsed_sha256=parsed_sha256,
            pages=parsed.pages,
        )
    ]


STAGE = Stage(name="parse", startup=startup, handle=handle)
