"""Splitting text into chunks of at most so many tokens of one tokenizer, fast.

The chunk stage's splitter (stages/builtin/chunk.py): the boundaries semantic-text-splitter
draws, with each candidate's size looked up rather than tokenized afresh.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class TokenSplitter:
    """Splits text into chunks of at most `capacity` tokens of one tokenizer, `overlap` shared.

    The boundaries are the ones `TextSplitter.from_huggingface_tokenizer` draws, but that
    tokenizes every candidate chunk afresh while it searches for the largest that fits (ten
    or so per chunk: nearly all of the stage's CPU). For a tokenizer that tokenizes each word
    on its own (`_measures_words_alone`), each text is measured once instead and a
    candidate's size read off that (`_Ruler`); any other keeps the library's own measure.
    """

    def __init__(self, tokenizer: Tokenizer, capacity: int, overlap: int) -> None:
        from semantic_text_splitter import TextSplitter

        self.tokenizer = tokenizer
        self.capacity = capacity
        self.overlap = overlap
        alone = _measures_words_alone(tokenizer)
        self._plain = _PlainText(tokenizer) if alone else None
        self._measured_afresh = (
            None
            if alone
            else TextSplitter.from_huggingface_tokenizer(tokenizer, capacity, overlap=overlap)
        )

    def chunks(self, text: str) -> list[str]:
        """`text` in chunks, in order, trimmed of surrounding whitespace."""
        from semantic_text_splitter import TextSplitter

        if self._measured_afresh is not None:
            return self._measured_afresh.chunks(text)
        if self._plain is not None and self._plain.reads(text):
            ruler = self._plain.ruler(text)
        else:
            ruler = _Ruler.tokenized(self.tokenizer, text)
        # A splitter per text (cheap to make), so each measures its own, even in parallel.
        splitter = TextSplitter.from_callback(ruler.size, self.capacity, overlap=self.overlap)
        return splitter.chunks(text)


def _measures_words_alone(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` is BERT's kind: per-character normalizing, words split at spaces and
    punctuation, then WordPiece within each word, so a word's tokens never depend on its
    neighbours (a byte-level BPE's, say, depend on the space before the word)."""
    from tokenizers import models, normalizers, pre_tokenizers

    return (
        isinstance(tokenizer.model, models.WordPiece)
        and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        and (
            tokenizer.normalizer is None
            or isinstance(tokenizer.normalizer, normalizers.BertNormalizer)
        )
    )


class _Ruler:
    """Token counts of pieces of one text, read off one measure of the whole.

    The text is measured in units (tokens, or whole words), each with where it starts and
    ends, which word it is part of, and how many tokens come before it. With a tokenizer that
    tokenizes each word on its own, a piece that neither starts nor ends inside a word has
    exactly the tokens of the units that start within it. A piece that cuts a word (rare: a
    word longer than a chunk, or a cut where BERT sees no word boundary) is tokenized on its
    own.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        text: str,
        starts: Sequence[int],
        ends: Sequence[int],
        words: Sequence[int | None],
        tokens_before: Sequence[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.starts = starts
        self.ends = ends
        self.words = words
        self.tokens_before = tokens_before
        # The splitter measures pieces in document order, mostly from where the last began.
        self.hint = 0

    @classmethod
    def tokenized(cls, tokenizer: Tokenizer, text: str) -> _Ruler:
        """The ruler of `text` tokenized whole: one unit per token."""
        encoding = tokenizer.encode(text, add_special_tokens=False)
        offsets = encoding.offsets
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
        return cls(tokenizer, text, starts, ends, encoding.word_ids, range(len(offsets) + 1))

    def size(self, piece: str) -> int:
        """How many tokens `piece`, a piece of the text, has (without special tokens)."""
        # Where in the text it is does not matter, only that it starts and ends between words.
        start = self.text.find(piece, self.hint)
        if start < 0:
            start = self.text.find(piece)
        if start >= 0:
            first = self._first_unit_between_words(start)
            last = self._first_unit_between_words(start + len(piece))
            if first is not None and last is not None:
                self.hint = start
                return self.tokens_before[last] - self.tokens_before[first]
        return len(self.tokenizer.encode(piece, add_special_tokens=False).ids)

    def _first_unit_between_words(self, offset: int) -> int | None:
        """The index of the first unit at or after `offset`, if no word runs across it."""
        after = bisect.bisect_left(self.starts, offset)
        if after > 0 and (
            self.ends[after - 1] > offset
            or (after < len(self.starts) and self.words[after] == self.words[after - 1])
        ):
            return None
        return after


# ASCII that BERT's normalizer leaves as it is, but for case (tab and newlines become spaces,
# which the pre-tokenizer splits at as it does at spaces); other control characters it drops.
_UNTOUCHED_ASCII = re.compile(r"[\t\n\r -~]*")
# BERT's words in such text: runs of letters and digits, and each punctuation mark alone.
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")


class _PlainText:
    """BERT's tokenization of plain ASCII text (most documents), without running the tokenizer
    over it: its words found with a regular expression, each word's tokens counted once.

    Tokenizing a whole text just to count its words' tokens costs most of what is left of the
    stage's CPU, mostly spent tracking how normalizing moved each character, which in such
    text it does not.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        normalizer = tokenizer.normalizer
        self.lowercase = normalizer is not None and bool(normalizer.lowercase)
        # Special tokens match the raw text before any normalizing: "[MASK]" is one token.
        self.added = [
            token.content.lower() for token in tokenizer.get_added_tokens_decoder().values()
        ]
        # Words repeat from text to text; the cache is the splitter's, shared by its threads.
        self.word_tokens = functools.lru_cache(maxsize=1 << 16)(self._word_tokens)

    def reads(self, text: str) -> bool:
        """Whether `text` is text this reads exactly as the tokenizer does."""
        if not (text.isascii() and _UNTOUCHED_ASCII.fullmatch(text)):
            return False
        lowered = text.lower()
        return not any(token in lowered for token in self.added)

    def ruler(self, text: str) -> _Ruler:
        """The ruler of `text`: one unit per word."""
        starts: list[int] = []
        ends: list[int] = []
        tokens_before = [0]
        tokens = 0
        for word in _ASCII_WORD.finditer(text):
            starts.append(word.start())
            ends.append(word.end())
            tokens += self.word_tokens(word.group())
            tokens_before.append(tokens)
        return _Ruler(self.tokenizer, text, starts, ends, range(len(starts)), tokens_before)

    def _word_tokens(self, word: str) -> int:
        return len(self.tokenizer.model.tokenize(word.lower() if self.lowercase else word))
