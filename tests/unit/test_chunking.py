"""The chunk stage's splitter draws exactly the boundaries the library's own tokenizer measure
draws, while tokenizing each text once instead of once per candidate chunk."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from documents import make_docx, make_html, make_markdown, make_pdf
from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from contracts import media
from contracts.messages import ParsedDocument, Section
from contracts.settings import SPECIAL_TOKENS
from stages.backends.embedder import packaged_model_dir
from stages.builtin import chunk
from stages.formats import parse_document
from stages.kit import token_splitter

# Plain prose as most documents have it: ASCII words, numbers, punctuation, a URL, tabs and
# carriage returns, a word of many WordPiece pieces and one too long for WordPiece ([UNK]).
PLAIN = (
    "the report Council GRANITE winter payment journal temple repair rural seldom require "
    "unaffable supercalifragilistic don't 3.14 e-mail Hello,World! (paren) [1] #tag $5 ~ "
    "`code` a_b tab\tbed cr\rlf https://example.com/a/b?c=d&e=f "
    + "x" * 300
    + " "
    + "qwertyuiop" * 9
).split(" ")
# And what trips tokenizers up: accents (composed and not), CJK, emoji, ligatures, special
# tokens written in the text, control and zero-width characters.
TRICKY = [
    *PLAIN,
    *("naïve", "café", "Ünïcödé", "日本語", "中文字", "emoji😀", "ﬁne", "Straße", "İstanbul"),
    *("a\u0301b", "\u200bzero", "——", "…", "ǅ", "ᾈ", "ab\x01cd", "form\x0cfeed", "[MASK]", "[cls]"),
]


def prose(rng: random.Random, words: int, vocabulary: list[str]) -> str:
    """Seeded text of `words` words with sentences, lines and paragraphs."""
    out: list[str] = []
    for _ in range(words):
        out.append(rng.choice(vocabulary))
        gap = rng.random()
        out.append(". " if gap < 0.1 else "\n\n" if gap < 0.13 else "\n" if gap < 0.16 else " ")
    return "".join(out)


def document(seed: int, vocabulary: list[str]) -> ParsedDocument:
    """A parsed document of pages and headings, a few to a few hundred words under each."""
    rng = random.Random(seed)
    sections = [
        Section(text=prose(rng, rng.randint(5, 400), vocabulary), page=page, heading=heading)
        for page in range(1, 4)
        for heading in (None, f"Section {page}")
        for _ in range(rng.randint(1, 2))
    ]
    return ParsedDocument(content_type="text/markdown", sections=sections, pages=3)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    model = Tokenizer.from_file(str(packaged_model_dir() / "tokenizer.json"))
    model.no_truncation()
    model.no_padding()
    return model


def library_chunks(tokenizer: Tokenizer, capacity: int, overlap: int, text: str) -> list[str]:
    """The reference: what the chunk stage drew before, the library measuring every candidate
    with the tokenizer."""
    splitter = TextSplitter.from_huggingface_tokenizer(tokenizer, capacity, overlap=overlap)
    return splitter.chunks(text)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(256, 32), (128, 16), (64, 0)])
@pytest.mark.parametrize(
    ("vocabulary", "plain"), [(PLAIN, True), (TRICKY, False)], ids=["plain", "tricky"]
)
def test_the_stage_draws_the_boundaries_the_library_draws(
    tokenizer: Tokenizer, max_tokens: int, overlap: int, vocabulary: list[str], plain: bool
) -> None:
    splitter = chunk.make_splitter(packaged_model_dir(), max_tokens, overlap)
    # The packaged model's tokenizer is measured once per text: plain text by its words,
    # anything else tokenized whole.
    assert token_splitter._measures_words_alone(splitter.tokenizer)
    capacity = max_tokens - SPECIAL_TOKENS
    for seed in range(2):
        parsed = document(seed, vocabulary)
        texts = [
            "\n\n".join(s.text.strip() for s in group)
            for _, group in itertools.groupby(parsed.sections, lambda s: (s.page, s.heading))
        ]
        assert {token_splitter._PlainText(tokenizer).reads(text) for text in texts} == {plain}
        expected = [
            piece for text in texts for piece in library_chunks(tokenizer, capacity, overlap, text)
        ]
        got = [text for text, _, _ in chunk.split(parsed, splitter)]
        assert got == expected
        assert max(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in got) <= (
            capacity
        )


@pytest.mark.parametrize("vocabulary", [PLAIN, TRICKY], ids=["plain", "tricky"])
def test_a_piece_is_measured_as_the_tokenizer_measures_it_alone(
    tokenizer: Tokenizer, vocabulary: list[str]
) -> None:
    rng = random.Random(7)
    text = prose(rng, 3000, vocabulary)
    rulers = [token_splitter._Ruler.tokenized(tokenizer, text)]
    plain = token_splitter._PlainText(tokenizer)
    if plain.reads(text):
        rulers.append(plain.ruler(text))
    assert len(rulers) == (2 if vocabulary is PLAIN else 1)
    # Pieces cut anywhere, inside words too, and found anywhere in the text.
    for _ in range(300):
        start = rng.randrange(len(text))
        piece = text[start : rng.randint(start, min(len(text), start + 1500))]
        size = len(tokenizer.encode(piece, add_special_tokens=False).ids)
        assert [ruler.size(piece) for ruler in rulers] == [size] * len(rulers)


def real_document(kind: str, pages: list[str]) -> tuple[bytes, str]:
    """A file of `kind` holding `pages`, and its content type."""
    if kind == "pdf":
        return make_pdf(pages), media.PDF
    if kind == "docx":
        return make_docx(pages, [["Item", "Count"], ["granite", "7"]], "Report"), media.DOCX
    if kind == "html":
        return make_html("Report", pages), media.HTML
    return make_markdown("Report", {f"Part {i}": t for i, t in enumerate(pages)}), media.MARKDOWN


@pytest.mark.parametrize("kind", ["pdf", "docx", "html", "md"])
def test_real_documents_parsed_are_chunked_as_the_library_chunks_them(
    tokenizer: Tokenizer, tmp_path: Path, kind: str
) -> None:
    rng = random.Random(kind)
    english = PLAIN[:-5]  # prose without tabs, carriage returns and freak words
    pages = [prose(rng, 320, english).replace("\n", " ") for _ in range(5)]
    data, content_type = real_document(kind, pages)
    path = tmp_path / f"report.{kind}"
    path.write_bytes(data)
    parsed = parse_document(path, content_type)
    splitter = chunk.make_splitter(packaged_model_dir(), 256, 32)
    expected = [
        piece
        for _, group in itertools.groupby(parsed.sections, lambda s: (s.page, s.heading))
        for piece in library_chunks(
            tokenizer, 254, 32, "\n\n".join(s.text.strip() for s in group if s.text.strip())
        )
    ]
    assert len(expected) > 5
    assert [text for text, _, _ in chunk.split(parsed, splitter)] == expected


@pytest.mark.parametrize(
    "sentence",
    [
        # The tokenizer reads "[MASK]" as one token, not as three words.
        "Replace the word [MASK] here. ",
        # It drops control characters, joining what they split: "unaffable", "formfeed".
        "An un\x01affable clerk sent a form\x0cfeed. ",
    ],
    ids=["special-token", "control-characters"],
)
def test_ascii_the_tokenizer_does_not_read_as_plain_words_is_tokenized_whole(
    tokenizer: Tokenizer, sentence: str
) -> None:
    text = sentence * 40
    assert not token_splitter._PlainText(tokenizer).reads(text)
    splitter = chunk.make_splitter(packaged_model_dir(), 64, 8)
    assert splitter.chunks(text) == library_chunks(tokenizer, 62, 8, text)


def test_a_tokenizer_whose_words_depend_on_their_neighbours_keeps_the_library_measure() -> None:
    rng = random.Random(3)
    # Byte-level BPE: a word's tokens include the space before it.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        [prose(rng, 200, PLAIN) for _ in range(20)], trainers.BpeTrainer(vocab_size=300)
    )
    splitter = token_splitter.TokenSplitter(bpe, 40, 8)
    text = prose(rng, 800, PLAIN)
    assert not token_splitter._measures_words_alone(bpe)
    assert splitter.chunks(text) == library_chunks(bpe, 40, 8, text)
