"""The corpus: seeded PDF, DOCX, HTML and Markdown documents, generated here, never fetched."""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from documents import make_docx, make_html, make_markdown, make_pdf

from bench.answer_time import WORDS, paragraph, small_document

KINDS = ("pdf", "docx", "html", "md")
# About what a printed page of prose holds.
WORDS_PER_PAGE = 300
DOCUMENTS_AT_SCALE_1 = 60
MAX_PAGES = 20


@dataclass(frozen=True)
class Document:
    """One generated file: its name, bytes and how many pages or sections it has."""

    name: str
    data: bytes
    pages: int


def document(i: int, kind: str, pages: int) -> Document:
    """Document `i` of the corpus: `pages` pages (PDF) or sections of about 300 words."""
    rng = random.Random(f"corpus-{i}")
    title = f"Report {i} on the {rng.choice(WORDS)} {rng.choice(WORDS)}"
    texts = [paragraph(rng, WORDS_PER_PAGE) for _ in range(pages)]
    name = f"doc-{i:03d}.{kind}"
    if kind == "pdf":
        return Document(name, make_pdf(texts), pages)
    if kind == "docx":
        table = [["Item", "Count"]] + [
            [rng.choice(WORDS), str(rng.randint(1, 999))] for _ in range(rng.randint(2, 8))
        ]
        return Document(name, make_docx(texts, table, heading=title), pages)
    if kind == "html":
        return Document(name, make_html(title, texts), pages)
    sections = {f"Section {n}: {rng.choice(WORDS)}": t for n, t in enumerate(texts, 1)}
    return Document(name, make_markdown(title, sections), pages)


def corpus(scale: float) -> list[Document]:
    """The mixed corpus: 60 documents at scale 1, the four formats in turn, 1-20 pages each."""
    count = max(4, round(DOCUMENTS_AT_SCALE_1 * scale))
    sizes = random.Random("corpus-sizes")
    return [document(i, KINDS[i % len(KINDS)], sizes.randint(1, MAX_PAGES)) for i in range(count)]


def _small(i: int) -> Document:
    name, data = small_document(i)
    return Document(name, data, 1)


def small_documents(count: int, first: int = 0) -> list[Document]:
    """`count` distinct short documents (150-400 words, the formats in turn), built on 2 cores."""
    # python-docx and fpdf take ~8 ms a file; thousands of them are worth a second process.
    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_small, range(first, first + count), chunksize=250))
