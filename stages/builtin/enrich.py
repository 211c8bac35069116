"""Enrich (optional, between chunk and embed): key phrases per chunk and the batch's language.

Keywords come from YAKE, which needs no model and no corpus: it scores each chunk's n-grams by
statistics of the chunk alone. The language comes from py3langid (its model ships in the
wheel) and picks YAKE's stopword list. Both are built once, at startup. Turn the stage on with
`SLUICE_STAGES=parse,chunk,enrich,embed,index`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from contracts import pipeline
from contracts.errors import Permanent
from contracts.messages import Chunk, ChunkBatch
from contracts.settings import Settings
from stages.stage import Stage

# Constants rather than settings: the stage has no `SLUICE_*` knobs of its own (yet).
# Key phrases kept per chunk, best first: enough to tag a search result, few enough to read.
KEYWORDS_PER_CHUNK = 8
# Longest key phrase, in words. YAKE's default is 3, whose extra phrases mostly straddle a
# stopword ("Antarctic and back"); 2 reads better and is a little faster.
MAX_NGRAM_WORDS = 2
# The language is detected on this much of a batch's text: plenty for a confident answer,
# and it bounds the cost of a batch of long chunks.
LANGUAGE_SAMPLE_CHARS = 20_000
# Below this probability the batch's language stays unknown (None) rather than a guess:
# word lists, tables and numbers score low for every language.
MIN_LANGUAGE_CONFIDENCE = 0.5
# Detected language (ISO 639-1) → YAKE's stopword list, for every list YAKE 0.7 ships. YAKE
# names Czech `cz`; its `br` is Brazilian Portuguese, not Breton, so `br` is left out.
_SAME_CODE = (
    "ar bg da de el en es et fa fi fr hi hr hu hy id it ja lt lv nl no pl pt ro ru "
    "sk sl sv tr uk zh"
)
YAKE_STOPWORDS: Mapping[str, str] = MappingProxyType(
    {**{c: c for c in _SAME_CODE.split()}, "cs": "cz"}
)
FALLBACK_STOPWORDS = "en"
# py3langid's label for text with no linguistic content (numbers, symbols).
NO_LANGUAGE = "zxx"
FAILED = "keyword_extraction_failed"


class _SwallowedErrors(logging.Filter):
    """Catch the warning YAKE logs in place of raising, so the stage can raise it after all.

    YAKE 0.7's `extract_keywords` catches every exception, logs "Exception during keyword
    extraction: ..." and returns []: a broken extractor would look like chunks that have no
    key phrases. The record is held per thread (the thread that ran YAKE) and not logged:
    it quotes the document's text, and the stage's own error says what failed.
    """

    PREFIX = "Exception during keyword extraction"

    def __init__(self) -> None:
        super().__init__()
        self._seen = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep YAKE's failure for `take` instead of logging it; let other records through."""
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        self._seen.error = message.split(" (text preview:", 1)[0].removeprefix(self.PREFIX)
        return False

    def take(self) -> str | None:
        """The failure YAKE swallowed in this thread since the last `take`, if any."""
        error: str | None = getattr(self._seen, "error", None)
        self._seen.error = None
        return error


# One per process: the logger is process-wide, and startup may run more than once (tests).
_SWALLOWED = _SwallowedErrors()


@dataclass(frozen=True)
class EnrichContext:
    """What the enrich stage needs: a YAKE extractor per stopword list and the identifier."""

    extractors: Mapping[str, Any]
    identifier: Any
    swallowed: _SwallowedErrors
    # YAKE's extractors keep caches they clear as they go, unlocked, so two threads must
    # not run them at once; under the GIL a second thread would gain nothing anyway.
    lock: threading.Lock

    def extractor_for(self, language: str | None) -> Any:
        """The extractor with the language's stopwords, or English ones when YAKE has none."""
        stopwords = YAKE_STOPWORDS.get(language or "", FALLBACK_STOPWORDS)
        return self.extractors[stopwords]


def make_context() -> EnrichContext:
    """Build every extractor and load the language model (well under a second)."""
    import yake
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    yake_log = logging.getLogger("yake.core.yake")
    if _SWALLOWED not in yake_log.filters:
        yake_log.addFilter(_SWALLOWED)
    # The failure warning must be created to be caught, whatever level the process logs at.
    yake_log.setLevel(logging.WARNING)
    # YAKE prints (not logs) a warning for each stopword list it reads as Latin-1.
    with contextlib.redirect_stdout(io.StringIO()):
        extractors = {
            lan: yake.KeywordExtractor(lan=lan, n=MAX_NGRAM_WORDS, top=KEYWORDS_PER_CHUNK)
            for lan in set(YAKE_STOPWORDS.values())
        }
    # Probabilities, not raw scores, so a weak guess can be told from a confident one.
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return EnrichContext(MappingProxyType(extractors), identifier, _SWALLOWED, threading.Lock())


async def startup(settings: Settings) -> EnrichContext:
    """Build the extractors and the language identifier once for the process."""
    return await asyncio.to_thread(make_context)


def detect_language(text: str, ctx: EnrichContext) -> str | None:
    """The text's language (ISO 639-1, or 639-3 where there is none), None when unsure."""
    if not text.strip():
        return None
    language, confidence = ctx.identifier.classify(text[:LANGUAGE_SAMPLE_CHARS])
    if language == NO_LANGUAGE or confidence < MIN_LANGUAGE_CONFIDENCE:
        return None
    return str(language)


def keywords(chunk: Chunk, extractor: Any, ctx: EnrichContext, filename: str) -> list[str]:
    """One chunk's key phrases, best first; [] for a chunk with no text."""
    if not chunk.text.strip():
        return []
    ctx.swallowed.take()
    try:
        scored = extractor.extract_keywords(chunk.text)
    except Exception as exc:
        raise _failed(filename, chunk, f"{type(exc).__name__}: {exc}") from exc
    swallowed = ctx.swallowed.take()
    if swallowed is not None:
        raise _failed(filename, chunk, swallowed.strip(": "))
    return [str(phrase) for phrase, _score in scored]


def _failed(filename: str, chunk: Chunk, why: str) -> Permanent:
    return Permanent(
        f"{filename}: keyword extraction (YAKE) failed on chunk {chunk.chunk_index}: {why}. "
        "Retrying the same text fails the same way; drop `enrich` from SLUICE_STAGES to index "
        "the document without keywords, or retry the job once YAKE is fixed.",
        code=FAILED,
    )


def enrich(msg: ChunkBatch, ctx: EnrichContext) -> ChunkBatch:
    """The batch with its language and every chunk's keywords (CPU work: run it in a thread)."""
    language = detect_language("\n\n".join(c.text for c in msg.chunks), ctx)
    extractor = ctx.extractor_for(language)
    with ctx.lock:
        chunks = [
            c.model_copy(update={"keywords": keywords(c, extractor, ctx, msg.filename)})
            for c in msg.chunks
        ]
    return ChunkBatch(
        **msg.envelope(),
        batch_index=msg.batch_index,
        batch_count=msg.batch_count,
        chunks_total=msg.chunks_total,
        language=language,
        chunks=chunks,
    )


async def handle(msg: ChunkBatch, ctx: EnrichContext) -> list[ChunkBatch]:
    """Hand on the batch (same index and count) with keywords per chunk and its language."""
    return [await asyncio.to_thread(enrich, msg, ctx)]


STAGE = Stage(spec=pipeline.ENRICH, startup=startup, handle=handle)
