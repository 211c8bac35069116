"""The stages build a reindex's generation: chunked and embedded as its profile says, and
written under the generation's own index name. Handlers are called directly, with the real
tokenizer, the real model and a real LanceDB index."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from contracts.errors import Permanent, Transient
from contracts.generations import chunk_sizes
from contracts.media import MARKDOWN
from contracts.messages import (
    Chunk,
    ChunkBatch,
    DocumentParsed,
    IndexProfile,
    ParsedDocument,
    Section,
)
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.backends.embedder import SentenceTransformerEmbedder, packaged_model_dir
from stages.backends.factory import embedder_for, resolve_model_dir
from stages.backends.lance_index import LanceIndex
from stages.builtin import chunk, embed, index

ENVELOPE = {"job_id": "j1", "document_id": "d1", "collection": "default", "filename": "f"}
SENTENCE = "Tidal pools hold anemones, crabs and small fish between the rocks. "
# A model of 64 dimensions: the packaged one's files, with a projection added (seeded).
SMALL_DIMENSIONS = 64


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, chunks_per_message=4)


def copy_of_packaged_model(target: Path, *, dimensions: int | None = None) -> Path:
    """A directory of links to the packaged model's files: another path, the same model, or
    with a seeded projection to `dimensions` (another model, as far as vectors go)."""
    target.mkdir(parents=True)
    source = packaged_model_dir()
    for entry in source.iterdir():
        if entry.name != "modules.json" or dimensions is None:
            os.symlink(entry, target / entry.name)
    if dimensions is not None:
        import torch
        from sentence_transformers.sentence_transformer.modules import Dense

        torch.manual_seed(0)
        (target / "2_Dense").mkdir()
        Dense(384, dimensions, bias=False).save(str(target / "2_Dense"))
        modules = json.loads((source / "modules.json").read_text())
        dense = {"name": "2d", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        modules = [{**m, "idx": i} for i, m in enumerate([*modules[:2], dense, *modules[2:]])]
        (target / "modules.json").write_text(json.dumps(modules))
    return target


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_of_packaged_model(tmp_path_factory.mktemp("models") / "small", dimensions=64)


@pytest.fixture(scope="module")
def linked_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_of_packaged_model(tmp_path_factory.mktemp("models") / "linked")


def parsed_message(settings: Settings, **fields: object) -> DocumentParsed:
    """A long parsed document in the blob store, as a reindex sends it to the chunk stage."""
    parsed = ParsedDocument(
        content_type=MARKDOWN,
        sections=[
            Section(text=SENTENCE * 60, heading="Pools"),
            Section(text="Gulls nest here.", heading="Cliffs"),
        ],
    )
    blobs = LocalBlobStore(settings.blob_dir)
    return DocumentParsed(
        **ENVELOPE,
        blob_sha256="0" * 64,
        parsed_sha256=blobs.put_bytes(parsed.model_dump_json().encode()),
        **fields,
    )


def tokens(model_dir: Path, text: str) -> int:
    """The length of a text in a model's tokens, its special tokens included."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return len(tokenizer.encode(text).ids)


# The chunk stage.


async def test_a_profile_of_128_tokens_makes_more_smaller_chunks(settings: Settings) -> None:
    ctx = await chunk.startup(settings)
    default = [c for b in await chunk.handle(parsed_message(settings), ctx) for c in b.chunks]
    profile = IndexProfile(chunk_max_tokens=128, chunk_overlap_tokens=16)
    batches = await chunk.handle(parsed_message(settings, generation=1, profile=profile), ctx)
    small = [c for b in batches for c in b.chunks]
    assert len(small) > len(default)
    assert max(tokens(packaged_model_dir(), c.text) for c in small) <= 128
    assert max(tokens(packaged_model_dir(), c.text) for c in default) > 128
    # The generation and its profile go on with the chunks, to the embed and index stages.
    assert {(b.generation, b.profile) for b in batches} == {(1, profile)}


async def test_splitters_are_built_once_per_model_and_sizes(
    settings: Settings, linked_model: Path
) -> None:
    splitters = chunk.Splitters(settings)
    default = splitters.for_profile(None)
    assert splitters.for_profile(IndexProfile()) is default
    assert splitters.for_profile(IndexProfile(model=settings.embed_model_name)) is default
    small = splitters.for_profile(IndexProfile(chunk_max_tokens=128))
    assert small is not default
    assert splitters.for_profile(IndexProfile(chunk_max_tokens=128)) is small
    by_path = splitters.for_profile(IndexProfile(model=str(linked_model)))
    assert by_path is not default
    assert splitters.for_profile(IndexProfile(model=str(linked_model))) is by_path


@pytest.mark.parametrize(
    ("profile", "code"),
    [
        (IndexProfile(chunk_max_tokens=64, chunk_overlap_tokens=40), "invalid_profile"),
        # The deployment's overlap (32) with a profile's small chunks: too much of each.
        (IndexProfile(chunk_max_tokens=48), "invalid_profile"),
        # Longer than the model reads (256 tokens): their ends would never be embedded.
        (IndexProfile(chunk_max_tokens=512), "invalid_profile"),
        (IndexProfile(model="no-such-model"), "unknown_model"),
        (IndexProfile(model="/nonexistent/model"), "unknown_model"),
    ],
)
async def test_a_profile_that_cannot_be_used_fails_the_document_for_good(
    settings: Settings, profile: IndexProfile, code: str
) -> None:
    ctx = await chunk.startup(settings)
    with pytest.raises(Permanent) as raised:
        await chunk.handle(parsed_message(settings, generation=1, profile=profile), ctx)
    assert raised.value.code == code


def test_chunk_sizes_are_the_profiles_or_the_deployments(settings: Settings) -> None:
    assert chunk_sizes(settings, None) == chunk_sizes(settings, IndexProfile())
    sizes = chunk_sizes(settings, IndexProfile(chunk_max_tokens=128))
    assert (sizes.max_tokens, sizes.overlap_tokens) == (128, settings.chunk_overlap_tokens)
    sizes = chunk_sizes(settings, IndexProfile(chunk_overlap_tokens=0))
    assert (sizes.max_tokens, sizes.overlap_tokens) == (settings.chunk_max_tokens, 0)
    with pytest.raises(Permanent) as raised:
        chunk_sizes(settings, IndexProfile(chunk_max_tokens=66, chunk_overlap_tokens=33))
    assert raised.value.code == "invalid_profile"
    assert "at most 32" in raised.value.message


async def test_chunk_drops_a_reindexed_document_deleted_meanwhile(settings: Settings) -> None:
    # A delete leaves a tombstone in each generation; the stage asks the one it builds.
    LanceIndex(settings.index_dir).delete_document("default.g1", "d1")
    ctx = await chunk.startup(settings)
    gone = {"blob_sha256": "f" * 64, "parsed_sha256": "f" * 64}
    assert await chunk.handle(DocumentParsed(**ENVELOPE, generation=1, **gone), ctx) == []
    with pytest.raises(Transient) as raised:
        await chunk.handle(DocumentParsed(**ENVELOPE, generation=2, **gone), ctx)
    assert raised.value.code == "blob_missing"


# Naming a model.


def test_a_model_is_the_deployments_name_or_a_sentence_transformers_directory(
    settings: Settings, linked_model: Path, tmp_path: Path
) -> None:
    assert resolve_model_dir(settings, None) == packaged_model_dir()
    assert resolve_model_dir(settings, "all-MiniLM-L6-v2") == packaged_model_dir()
    assert resolve_model_dir(settings, str(linked_model)) == linked_model
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no tokenizer
    for name in ("bge-small", "relative/dir", str(tmp_path / "missing"), str(half)):
        with pytest.raises(Permanent) as raised:
            resolve_model_dir(settings, name)
        assert raised.value.code == "unknown_model"
        assert name in raised.value.message


def test_naming_a_model_loads_no_model_library(linked_model: Path) -> None:
    # The gateway checks a reindex's model name with it, in a process that has no model.
    script = (
        "import sys\n"
        "from contracts.settings import Settings\n"
        "from stages.backends.factory import resolve_model_dir\n"
        f"resolve_model_dir(Settings(), {str(linked_model)!r})\n"
        "loaded = {'torch', 'sentence_transformers', 'transformers'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=root)


def test_a_model_that_will_not_load_is_unknown(settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    (broken / "modules.json").write_text("not json")
    with pytest.raises(Permanent) as raised:
        embedder_for(settings, str(broken))
    assert raised.value.code == "unknown_model"
    assert str(broken) in raised.value.message


# The embed stage.


def _batch(texts: list[str], profile: IndexProfile | None = None, job: str = "j1") -> ChunkBatch:
    return ChunkBatch(
        **{**ENVELOPE, "job_id": job},
        generation=0 if profile is None else 1,
        profile=profile,
        batch_index=0,
        batch_count=1,
        chunks_total=len(texts),
        chunks=[Chunk(chunk_id=f"c{i}", chunk_index=i, text=t) for i, t in enumerate(texts)],
    )


@pytest.fixture(scope="module")
def embed_ctx() -> embed.EmbedContext:
    return embed.context_for(
        SentenceTransformerEmbedder(None, device="cpu", batch_size=16),
        max_items=64,
        max_wait_s=0.2,
        settings=Settings(embed_device="cpu"),
    )


async def test_embed_uses_the_model_a_profile_names_by_path(
    embed_ctx: embed.EmbedContext, small_model: Path
) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    profile = IndexProfile(model=str(small_model))
    # Both in one shared model call: each model embeds its own texts only.
    (default,), (small,) = await asyncio.gather(
        embed.handle(_batch(texts), embed_ctx),
        embed.handle(_batch(texts, profile, job="j2"), embed_ctx),
    )
    assert default.matrix.shape == (2, 384)
    assert small.matrix.shape == (2, SMALL_DIMENSIONS)
    loaded = embed_ctx.models.get(str(small_model))
    assert isinstance(loaded, SentenceTransformerEmbedder)
    assert loaded.model_dir == small_model
    alone = loaded.embed(texts)
    for packed, vector in zip(small.matrix.tolist(), alone, strict=True):
        assert packed == pytest.approx(vector, abs=1e-5)
    assert (small.generation, small.profile) == (1, profile)
    # Loaded once: the next message finds it.
    assert embed_ctx.models.get(str(small_model)) is loaded


async def test_embed_takes_the_deployments_model_by_name_without_loading_it_again(
    embed_ctx: embed.EmbedContext,
) -> None:
    assert embed_ctx.models.get("all-MiniLM-L6-v2") is embed_ctx.embedder
    assert embed_ctx.models.get(str(packaged_model_dir())) is embed_ctx.embedder


@pytest.mark.parametrize("model", ["no-such-model", "/nonexistent/model"])
async def test_embed_refuses_an_unknown_model_for_good(
    embed_ctx: embed.EmbedContext, model: str
) -> None:
    with pytest.raises(Permanent) as raised:
        await embed.handle(_batch(["text"], IndexProfile(model=model)), embed_ctx)
    assert raised.value.code == "unknown_model"


class RecordingEmbedder:
    """An embedder that records the texts of each call and answers its own constant."""

    def __init__(self, value: float) -> None:
        self.dimensions = 2
        self.value = value
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text."""
        self.calls.append(list(texts))
        return [[self.value, 0.0] for _ in texts]


def test_one_model_call_never_mixes_models() -> None:
    one, two = RecordingEmbedder(1.0), RecordingEmbedder(2.0)
    items: list[embed.Item] = [(one, "a"), (two, "b"), (one, "c"), (two, "d")]
    vectors = [v.tolist() for v in embed.embed_by_model(items)]
    assert vectors == [[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    assert (one.calls, two.calls) == ([["a", "c"]], [["b", "d"]])


# The index stage, and the whole of a generation through embed and index.


async def test_index_writes_a_generation_under_its_own_name(
    tmp_path: Path, embed_ctx: embed.EmbedContext, small_model: Path
) -> None:
    lance = LanceIndex(tmp_path / "index")
    ctx = index.context_for(lance, max_batches=8, max_wait_s=0)
    texts = ["Gulls nest on the cliffs.", "Crabs hide in the pools."]
    (serving,) = await embed.handle(_batch(texts), embed_ctx)
    (building,) = await embed.handle(
        _batch(texts, IndexProfile(model=str(small_model)), job="j2"), embed_ctx
    )
    await index.handle(serving, ctx)
    await index.handle(building, ctx)
    assert {"chunks_default", "chunks_default.g1"} <= set(lance.db.list_tables().tables)
    assert sorted(lance.chunk_ids("default", "d1", searchable_only=True)) == ["c0", "c1"]
    assert sorted(lance.chunk_ids("default.g1", "d1", searchable_only=True)) == ["c0", "c1"]
    assert lance.batches_done("default.g1", "d1", "j2") == 1
    # Each generation searched with its own model's vectors.
    hits = lance.search("default.g1", building.matrix[1].tolist(), k=1)
    assert [h.chunk_id for h in hits] == ["c1"]
    hits = lance.search("default", serving.matrix[0].tolist(), k=1)
    assert [h.chunk_id for h in hits] == ["c0"]
    # The serving generation's version stays, though generation 1's was published after it.
    assert lance.chunk_count("default") == 2
