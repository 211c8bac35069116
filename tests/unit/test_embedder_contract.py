"""One body of tests for the `Embedder` seam, run against every implementation.

The in-process model (sentence-transformers), the ONNX Runtime export of the same model, and
an OpenAI-compatible endpoint (a fake server that runs the real model, named as the test
double it is) must all give one unit-length vector per text, in order, of `dimensions`
entries, for empty input too, and agree on which texts are alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.embeddings_server import FakeEmbeddingsServer

from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.http_embedder import HttpEmbedder
from stages.backends.onnx_embedder import OnnxEmbedder
from stages.backends.protocols import Embedder

TEXTS = [
    "Tidal pools hold anemones, crabs and small fish.",
    "Rock pools on the shore are full of crabs and sea anemones.",
    "Copper was mined in Cornwall for centuries.",
    "x",
]


@pytest.fixture(scope="module")
def model() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(None, "cpu", 16)


@pytest.fixture(scope="module")
def server(model: SentenceTransformerEmbedder) -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(model) as fake:
        yield fake


@pytest.fixture(scope="module", params=["torch", "onnx", "http"])
def embedder(
    request: pytest.FixtureRequest,
    model: SentenceTransformerEmbedder,
    tmp_path_factory: pytest.TempPathFactory,
) -> Embedder:
    if request.param == "torch":
        return model
    if request.param == "onnx":
        return OnnxEmbedder(None, 16, cache_dir=Path(tmp_path_factory.mktemp("onnx")))
    server: FakeEmbeddingsServer = request.getfixturevalue("server")
    return HttpEmbedder(server.url, model="all-MiniLM-L6-v2", batch_size=2)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_one_unit_vector_per_text_in_order(embedder: Embedder) -> None:
    vectors = embedder.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    # An endpoint learns its dimension from its first answer; the local ones know it at once.
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) == embedder.dimensions == 384
    for vector in vectors:
        assert math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-4)
    # Order is kept: each text alone gives the vector it got in the batch.
    assert _cosine(embedder.embed([TEXTS[2]])[0], vectors[2]) > 0.999


def test_alike_texts_are_nearer_than_unlike_ones(embedder: Embedder) -> None:
    pools, shore, copper, _ = embedder.embed(TEXTS)
    assert _cosine(pools, shore) > _cosine(pools, copper) + 0.2


def test_nothing_in_nothing_out(embedder: Embedder) -> None:
    assert len(embedder.embed([])) == 0


def test_every_implementation_agrees_with_the_model(
    embedder: Embedder, model: SentenceTransformerEmbedder
) -> None:
    for mine, reference in zip(embedder.embed(TEXTS), model.embed(TEXTS), strict=True):
        assert _cosine(mine, reference) > 0.999
