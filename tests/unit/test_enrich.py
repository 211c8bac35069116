"""The enrich handler called directly on real prose, with the real YAKE and py3langid."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yake
import yake.core.yake

from contracts.errors import Permanent
from contracts.messages import Chunk, ChunkBatch
from contracts.pipeline import build
from stages.builtin import enrich

ENVELOPE = {"job_id": "j1", "document_id": "d1", "collection": "default", "filename": "terns.md"}
ENGLISH = (
    "Arctic terns breed around the Arctic Circle and spend the northern winter in the "
    "Antarctic pack ice. Researchers who fitted the birds with light geolocators found that "
    "a single tern flies about seventy thousand kilometres a year, the longest migration "
    "known in the animal kingdom."
)
ENGLISH_2 = (
    "The lighthouse keeper logged wind speed and barometric pressure every morning, then "
    "climbed the spiral staircase to trim the lamp's wick before the fishing fleet set out."
)
GERMAN = (
    "Die Küstenseeschwalbe brütet rund um den nördlichen Polarkreis und verbringt den "
    "Winter im antarktischen Packeis. Forscher, die die Vögel mit leichten Geolokatoren "
    "ausgestattet haben, fanden heraus, dass eine einzelne Seeschwalbe jedes Jahr etwa "
    "siebzigtausend Kilometer zurücklegt."
)
FRENCH = (
    "La sterne arctique niche autour du cercle polaire et passe l'hiver austral sur la "
    "banquise de l'Antarctique. Les chercheurs qui ont équipé les oiseaux de géolocalisateurs "
    "légers ont découvert qu'une sterne parcourt environ soixante-dix mille kilomètres par an."
)


@pytest.fixture(scope="module")
def ctx() -> enrich.EnrichContext:
    return enrich.make_context()


def batch(*texts: str, index: int = 1, count: int = 3) -> ChunkBatch:
    chunks = [Chunk(chunk_id=f"c{i}", chunk_index=10 + i, text=t) for i, t in enumerate(texts)]
    return ChunkBatch(
        **ENVELOPE, batch_index=index, batch_count=count, chunks_total=30, chunks=chunks
    )


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


async def test_every_chunk_gets_keywords_drawn_from_its_own_words(
    ctx: enrich.EnrichContext,
) -> None:
    msg = batch(ENGLISH, ENGLISH_2)
    (out,) = await enrich.handle(msg, ctx)
    assert (out.batch_index, out.batch_count, out.chunks_total) == (1, 3, 30)
    assert out.envelope() == msg.envelope()
    assert [(c.chunk_id, c.chunk_index, c.text) for c in out.chunks] == [
        (c.chunk_id, c.chunk_index, c.text) for c in msg.chunks
    ]
    for chunk in out.chunks:
        assert chunk.keywords, chunk
        assert len(chunk.keywords) <= enrich.KEYWORDS_PER_CHUNK
        for phrase in chunk.keywords:
            assert 1 <= len(phrase.split()) <= enrich.MAX_NGRAM_WORDS
            assert words(phrase) <= words(chunk.text), (phrase, chunk.text)
    assert any("tern" in phrase.lower() for phrase in out.chunks[0].keywords or [])
    assert out.language == "en"


@pytest.mark.parametrize(("text", "language"), [(GERMAN, "de"), (FRENCH, "fr")])
async def test_language_is_detected_and_picks_the_stopwords(
    ctx: enrich.EnrichContext, text: str, language: str
) -> None:
    (out,) = await enrich.handle(batch(text), ctx)
    assert out.language == language
    assert ctx.extractor_for(language).config["lan"] == language
    (chunk,) = out.chunks
    assert chunk.keywords
    stopwords = ctx.extractor_for(language).stopword_set
    # Each phrase starts and ends with a content word of that language, not "die" or "les".
    for phrase in chunk.keywords:
        parts = phrase.lower().split()
        assert parts[0] not in stopwords and parts[-1] not in stopwords, phrase


def test_languages_without_a_yake_list_fall_back_to_english(ctx: enrich.EnrichContext) -> None:
    assert ctx.extractor_for("cs").config["lan"] == "cz"
    for language in ("cy", "br", None):
        assert ctx.extractor_for(language).config["lan"] == "en"


async def test_empty_chunks_get_no_keywords_and_no_text_no_language(
    ctx: enrich.EnrichContext,
) -> None:
    (out,) = await enrich.handle(batch("", "  \n\t ", ENGLISH), ctx)
    assert [c.keywords == [] for c in out.chunks] == [True, True, False]
    assert out.chunks[2].keywords
    (numbers,) = await enrich.handle(batch("12 345 678 - 90.1 / 2024"), ctx)
    assert numbers.language is None


async def test_a_yake_failure_is_permanent_with_a_reason(
    ctx: enrich.EnrichContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, text: str) -> list[tuple[str, float]]:
        raise ValueError("segmenter gave up")

    monkeypatch.setattr(yake.KeywordExtractor, "extract_keywords", broken)
    with pytest.raises(Permanent) as raised:
        await enrich.handle(batch(ENGLISH), ctx)
    assert raised.value.code == "keyword_extraction_failed"
    assert "terns.md" in raised.value.message
    assert "chunk 10" in raised.value.message
    assert "ValueError: segmenter gave up" in raised.value.message


async def test_a_failure_yake_swallows_is_permanent_too(
    ctx: enrich.EnrichContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # YAKE catches errors inside extract_keywords and returns []; the stage must not take
    # that for "no keywords".
    class Broken(yake.core.yake.DataCore):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("candidate graph is corrupt")

    monkeypatch.setattr(yake.core.yake, "DataCore", Broken)
    with pytest.raises(Permanent) as raised:
        await enrich.handle(batch(ENGLISH), ctx)
    assert raised.value.code == "keyword_extraction_failed"
    assert "candidate graph is corrupt" in raised.value.message
    # The document's text stays out of the reason (YAKE's own warning quotes it).
    assert "Arctic" not in raised.value.message
    monkeypatch.undo()
    (out,) = await enrich.handle(batch(ENGLISH), ctx)
    assert out.chunks[0].keywords


def test_the_stage_is_declared_between_chunk_and_embed() -> None:
    assert enrich.STAGE.spec.name == "enrich"
    pipeline = build("parse,chunk,enrich,embed,index")
    assert pipeline.output_key("chunk") == enrich.STAGE.spec.input_key
    assert pipeline.next_of("enrich") == pipeline.spec("embed")
