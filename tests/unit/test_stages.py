"""Each stage's handler called directly, on real files, with real resources (no broker)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from documents import make_docx, make_markdown, make_pdf
from tokenizers import Tokenizer

from contracts.errors import Permanent, Transient
from contracts.media import DOCX, MARKDOWN, PDF
from contracts.messages import (
    Chunk,
    ChunkBatch,
    DocumentParsed,
    DocumentUploaded,
    EmbeddedBatch,
    ParsedDocument,
    Section,
)
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.backends.embedder import SentenceTransformerEmbedder, packaged_model_dir
from stages.backends.lance_index import LanceIndex
from stages.builtin import chunk, embed, index, parse

ENVELOPE = {"job_id": "j1", "document_id": "d1", "collection": "default", "filename": "f"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, chunks_per_message=4)


@pytest.fixture(scope="module")
def embed_ctx() -> embed.EmbedContext:
    return embed.context_for(
        SentenceTransformerEmbedder(None, device="cpu", batch_size=16), max_items=64, max_wait_s=0
    )


async def _parse(settings: Settings, data: bytes, content_type: str) -> DocumentParsed:
    ctx = await parse.startup(settings)
    try:
        sha = ctx.blobs.put_bytes(data)
        msg = DocumentUploaded(
            **ENVELOPE, blob_sha256=sha, content_type=content_type, size_bytes=len(data)
        )
        (out,) = await parse.handle(msg, ctx)
        assert isinstance(out, DocumentParsed), out
        return out
    finally:
        await parse.STAGE.shutdown(ctx)


async def test_parse_stores_sections_with_pages(settings: Settings) -> None:
    out = await _parse(settings, make_pdf(["alpha page", "beta page", "gamma page"]), PDF)
    assert out.pages == 3
    blobs = LocalBlobStore(settings.blob_dir)
    parsed = ParsedDocument.model_validate_json(blobs.read_bytes(out.parsed_sha256))
    assert [(s.page, s.text.strip()) for s in parsed.sections] == [
        (1, "alpha page"),
        (2, "beta page"),
        (3, "gamma page"),
    ]


async def test_parse_rejects_a_broken_docx_permanently(settings: Settings) -> None:
    with pytest.raises(Permanent) as raised:
        await _parse(settings, make_docx(["x"], [["a"]])[:200], DOCX)
    assert raised.value.code == "unreadable_docx"


async def test_chunks_are_token_bounded_batched_and_deterministic(settings: Settings) -> None:
    sentence = "Tidal pools hold anemones, crabs and small fish between the rocks. "
    markdown = make_markdown("Shore", {"Pools": sentence * 60, "Cliffs": "Gulls nest here."})
    parsed = await _parse(settings, markdown, MARKDOWN)
    ctx = await chunk.startup(settings)
    batches = await chunk.handle(parsed, ctx)
    again = await chunk.handle(parsed, ctx)
    assert [b.model_dump() for b in batches] == [b.model_dump() for b in again]

    chunks = [c for b in batches for c in b.chunks]
    total = len(chunks)
    assert total > 4, "a long section must split into several chunks"
    assert len(batches) == math.ceil(total / 4)
    assert all(b.batch_count == len(batches) and b.chunks_total == total for b in batches)
    assert [c.chunk_index for c in chunks] == list(range(total))
    assert len({c.chunk_id for c in chunks}) == total

    # Measured again, independently, with the model's own tokenizer and its special tokens.
    tok = Tokenizer.from_file(str(packaged_model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    assert max(len(tok.encode(c.text).ids) for c in chunks) <= settings.chunk_max_tokens
    assert {c.heading for c in chunks} >= {"Pools", "Cliffs"}


async def test_a_document_with_no_text_fails_chunking(settings: Settings) -> None:
    blobs = LocalBlobStore(settings.blob_dir)
    empty = ParsedDocument(content_type=PDF, pages=1, sections=[Section(text="  ", page=1)])
    msg = DocumentParsed(
        **ENVELOPE,
        blob_sha256="0" * 64,
        parsed_sha256=blobs.put_bytes(empty.model_dump_json().encode()),
    )
    with pytest.raises(Permanent) as raised:
        await chunk.handle(msg, await chunk.startup(settings))
    assert raised.value.code == "no_text"


def _batch(texts: list[str], index_: int = 0, count: int = 1) -> ChunkBatch:
    return ChunkBatch(
        **ENVELOPE,
        batch_index=index_,
        batch_count=count,
        chunks_total=len(texts) * count,
        chunks=[
            Chunk(chunk_id=f"c{index_}-{i}", chunk_index=i, text=t, page=1)
            for i, t in enumerate(texts)
        ],
    )


async def test_embed_gives_unit_vectors_that_rank_by_meaning(
    embed_ctx: embed.EmbedContext,
) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
    (out,) = await embed.handle(_batch(texts), embed_ctx)
    assert isinstance(out, EmbeddedBatch)
    assert [c.text for c in out.chunks] == texts
    vectors = out.matrix.tolist()
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[1])


async def test_index_upserts_and_replaces_old_versions(
    tmp_path: Path, embed_ctx: embed.EmbedContext
) -> None:
    ctx = index.context_for(LanceIndex(tmp_path / "index"), max_batches=4, max_wait_s=0)
    first = [await embed.handle(_batch(["one", "two"], i, 2), embed_ctx) for i in range(2)]
    for (batch,) in first:
        assert await index.handle(batch, ctx) == []
        await index.handle(batch, ctx)  # a redelivery must not duplicate
    assert sorted(ctx.index.chunk_ids("default", "d1")) == sorted(
        c.chunk_id for (b,) in first for c in b.chunks
    )
    assert ctx.index.batches_done("default", "d1", "j1") == 2

    newer = ChunkBatch(**{**_batch(["three"]).model_dump(), "job_id": "j2"})
    (embedded,) = await embed.handle(newer, embed_ctx)
    embedded = EmbeddedBatch(
        **{
            **embedded.model_dump(),
            "chunks": [{**c.model_dump(), "chunk_id": "new-0"} for c in embedded.chunks],
        }
    )
    await index.handle(embedded, ctx)
    assert ctx.index.chunk_ids("default", "d1") == ["new-0"]
    assert ctx.index.batches_done("default", "d1", "j1") == 0
    assert ctx.index.batches_done("default", "d1", "j2") == 1
    hits = ctx.index.search("default", embedded.matrix[0].tolist(), k=5)
    assert [h.text for h in hits] == ["three"]


async def test_concurrent_index_batches_share_one_write(
    tmp_path: Path, embed_ctx: embed.EmbedContext
) -> None:
    lance = LanceIndex(tmp_path / "index")
    ctx = index.context_for(lance, max_batches=8, max_wait_s=0.5)
    batches = [(await embed.handle(_batch([f"text {i}"], i, 4), embed_ctx))[0] for i in range(4)]
    await asyncio.gather(*(index.handle(b, ctx) for b in batches))
    table = lance.db.open_table("chunks_default")
    assert sorted(lance.chunk_ids("default", "d1")) == [f"c{i}-0" for i in range(4)]
    # One merge for four messages: the table's first version is its creation, the second
    # the shared write.
    assert table.version == 2


async def test_a_batch_and_its_redelivery_in_one_write_store_each_chunk_once(
    tmp_path: Path, embed_ctx: embed.EmbedContext
) -> None:
    lance = LanceIndex(tmp_path / "index")
    ctx = index.context_for(lance, max_batches=8, max_wait_s=0.5)
    (batch,) = await embed.handle(_batch(["once", "only"]), embed_ctx)
    await asyncio.gather(index.handle(batch, ctx), index.handle(batch, ctx))
    assert sorted(lance.chunk_ids("default", "d1")) == ["c0-0", "c0-1"]


async def test_parse_and_chunk_drop_a_document_deleted_before_its_blob_was_read(
    settings: Settings,
) -> None:
    # DELETE removes the blobs while messages of the document are still queued: a stage that
    # then finds its blob gone ends the message instead of retrying until it is dead-lettered.
    deleted = {**ENVELOPE, "document_id": "d" * 32, "job_id": "a" * 32}
    live = {**ENVELOPE, "document_id": "e" * 32, "job_id": "b" * 32}
    LanceIndex(settings.index_dir).delete_document("default", deleted["document_id"])
    gone = "f" * 64  # the sha256 of no stored blob

    ctx = await parse.startup(settings)
    try:
        uploaded = {"blob_sha256": gone, "content_type": MARKDOWN, "size_bytes": 10}
        assert await parse.handle(DocumentUploaded(**deleted, **uploaded), ctx) == []
        # A blob missing for a live document may still be on its way: retried, as before.
        with pytest.raises(Transient) as raised:
            await parse.handle(DocumentUploaded(**live, **uploaded), ctx)
        assert raised.value.code == "blob_missing"
    finally:
        await parse.STAGE.shutdown(ctx)

    ctx_chunk = await chunk.startup(settings)
    parsed = {"blob_sha256": gone, "parsed_sha256": gone}
    assert await chunk.handle(DocumentParsed(**deleted, **parsed), ctx_chunk) == []
    with pytest.raises(Transient) as raised:
        await chunk.handle(DocumentParsed(**live, **parsed), ctx_chunk)
    assert raised.value.code == "blob_missing"
