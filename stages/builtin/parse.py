"""Parse: sniffed bytes → text sections with page numbers, stored in the blob store."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.messages import DocumentParsed, DocumentUploaded
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.formats import Limits, parse_document
from stages.kit.sandbox import Sandbox
from stages.stage import Stage


@dataclass(frozen=True)
class ParseContext:
    """What the parse stage needs: the blob store, its limits, and worker processes to parse in."""

    blobs: LocalBlobStore
    limits: Limits
    sandbox: Sandbox


async def startup(settings: Settings) -> ParseContext:
    """Open the blob store and start one parse worker per concurrent message."""
    sandbox = Sandbox(
        settings.tuning("parse").concurrency,
        timeout_s=settings.parse_timeout_s,
        memory_mb=settings.parse_memory_mb,
        recycle_mb=settings.parse_worker_recycle_mb,
        preload=["stages.formats"],
    )
    await sandbox.start()
    return ParseContext(
        blobs=LocalBlobStore(settings.blob_dir),
        limits=Limits.from_settings(settings),
        sandbox=sandbox,
    )


async def handle(msg: DocumentUploaded, ctx: ParseContext) -> list[DocumentParsed]:
    """Extract the text of an upload; a bad, too big or too slow file fails the job."""
    source = ctx.blobs.path(msg.blob_sha256)
    if not source.is_file():
        ctx.blobs.read_bytes(msg.blob_sha256)  # raises Transient with the path in its message
    parsed = await ctx.sandbox.run(parse_document, source, msg.content_type, ctx.limits)
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


STAGE = Stage(name="parse", startup=startup, handle=handle, shutdown=shutdown)
