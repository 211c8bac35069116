"""Parse: sniffed bytes → text sections with page numbers, stored in the blob store."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import pipeline
from contracts.errors import Transient
from contracts.messages import DocumentParsed, DocumentUploaded
from contracts.settings import Settings
from stages.backends.factory import open_blob_store
from stages.backends.protocols import BlobStore
from stages.formats import Limits, parse_document
from stages.kit.deletions import Deletions
from stages.kit.sandbox import Sandbox
from stages.stage import Stage


@dataclass(frozen=True)
class ParseContext:
    """What the parse stage needs: the blob store, its limits, worker processes to parse in,
    and how to tell that a document was deleted."""

    blobs: BlobStore
    limits: Limits
    sandbox: Sandbox
    deletions: Deletions


async def startup(settings: Settings) -> ParseContext:
    """Open the blob store and start one parse worker per concurrent message."""
    sandbox = Sandbox(
        settings.stage("parse").concurrency,
        timeout_s=settings.parse_timeout_s,
        memory_mb=settings.parse_memory_mb,
        recycle_mb=settings.parse_worker_recycle_mb,
        preload=["stages.formats"],
    )
    await sandbox.start()
    return ParseContext(
        blobs=open_blob_store(settings),
        limits=Limits.from_settings(settings),
        sandbox=sandbox,
        deletions=Deletions(settings),
    )


async def handle(msg: DocumentUploaded, ctx: ParseContext) -> list[DocumentParsed]:
    """Extract the text of an upload; a bad, too big or too slow file fails the job, and one
    deleted before its turn (its upload gone with it) is dropped."""
    try:
        with ctx.blobs.as_file(msg.blob_sha256) as source:
            parsed = await ctx.sandbox.run(parse_document, source, msg.content_type, ctx.limits)
    except Transient as exc:
        if await ctx.deletions.explains(msg, exc):
            return []
        raise
    parsed_sha256 = ctx.blobs.put_bytes(parsed.model_dump_json().encode())
    return [
        DocumentParsed(
            **msg.envelope(),
            blob_sha256=msg.blob_sha256,
            parsed_sha256=parsed_sha256,
            pages=parsed.pages,
        )
    ]


async def shutdown(ctx: ParseContext) -> None:
    """Stop the parse workers."""
    await ctx.sandbox.close()


STAGE = Stage(spec=pipeline.PARSE, startup=startup, handle=handle, shutdown=shutdown)
