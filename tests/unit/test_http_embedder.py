"""The HTTP embedder against a fake OpenAI-compatible endpoint that runs the real model."""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from fakes.embeddings_server import Data, FakeEmbeddingsServer

from contracts.errors import Permanent, Transient
from contracts.settings import Settings
from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.factory import make_embedder
from stages.backends.http_embedder import HttpEmbedder

TEXTS = [
    "Tidal pools hold anemones, crabs and small fish.",
    "The lighthouse keeper logged every passing ship.",
    "Sourdough needs a lively starter and patience.",
    "Copper was mined in Cornwall for centuries.",
    "A short one.",
]


@pytest.fixture(scope="module")
def model() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(None, "cpu", 64)


@pytest.fixture(scope="module")
def server(model: SentenceTransformerEmbedder) -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(model) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeEmbeddingsServer) -> FakeEmbeddingsServer:
    server.reset()
    return server


def http_embedder(url: str, **options: object) -> HttpEmbedder:
    settings = Settings(embed_url=url, **options)  # type: ignore[arg-type]
    embedder = make_embedder(settings)
    assert isinstance(embedder, HttpEmbedder)
    return embedder


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def test_vectors_equal_the_in_process_models_and_are_unit_length(
    fake: FakeEmbeddingsServer, model: SentenceTransformerEmbedder
) -> None:
    fake.scale = 3.5  # An endpoint that does not normalise.
    embedder = http_embedder(fake.url, embed_batch_size=2)
    vectors = embedder.embed(TEXTS)
    expected = model.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    for got, want in zip(vectors, expected, strict=True):
        assert cosine(got, want) > 0.9999
        assert math.isclose(math.hypot(*got), 1.0, rel_tol=1e-6)
    assert embedder.dimensions == model.dimensions == 384
    # Batches of two: 2 + 2 + 1, each request named the configured model, without auth.
    assert [r.inputs for r in fake.received] == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:]]
    assert {r.model for r in fake.received} == {"all-MiniLM-L6-v2"}
    assert {r.authorization for r in fake.received} == {None}
    assert embedder.embed([]) == []


def test_api_key_is_sent_as_a_bearer_token(fake: FakeEmbeddingsServer) -> None:
    http_embedder(fake.url, embed_api_key="sk-test").embed(TEXTS[:1])
    assert fake.received[0].authorization == "Bearer sk-test"


def test_answers_out_of_order_are_put_back_in_index_order(
    fake: FakeEmbeddingsServer, model: SentenceTransformerEmbedder
) -> None:
    fake.out_of_order = True
    vectors = http_embedder(fake.url).embed(TEXTS)
    for got, want in zip(vectors, model.embed(TEXTS), strict=True):
        assert cosine(got, want) > 0.9999


@pytest.mark.parametrize("status", [503, 500, 429])
def test_server_errors_and_rate_limits_are_transient(
    fake: FakeEmbeddingsServer, status: int
) -> None:
    fake.fail_next(1, status)
    embedder = http_embedder(fake.url)
    with pytest.raises(Transient) as raised:
        embedder.embed(TEXTS)
    assert raised.value.code == "embedding_unavailable"
    assert f"{fake.url}/embeddings" in raised.value.message
    assert f"HTTP {status}" in raised.value.message
    assert fake.failed == 1
    # The failure was one request; the next one is answered.
    assert len(embedder.embed(TEXTS)) == len(TEXTS)


def test_rejected_input_is_permanent(fake: FakeEmbeddingsServer) -> None:
    fake.reject_marker = "TOO-LONG"
    with pytest.raises(Permanent) as raised:
        http_embedder(fake.url).embed(["fine", "this one is TOO-LONG"])
    assert raised.value.code == "embedding_rejected"
    assert "HTTP 400" in raised.value.message
    assert "rejected marker 'TOO-LONG'" in raised.value.message
    assert fake.rejected == 1


def test_unreachable_endpoint_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(Transient) as raised:
        http_embedder(url).embed(TEXTS)
    assert raised.value.code == "embedding_unavailable"
    assert f"{url}/embeddings could not be reached" in raised.value.message


def test_slow_endpoint_times_out_as_transient(fake: FakeEmbeddingsServer) -> None:
    fake.hold = threading.Event()
    try:
        with pytest.raises(Transient) as raised:
            http_embedder(fake.url, embed_timeout_s=0.2).embed(TEXTS)
    finally:
        fake.hold.set()
    assert raised.value.code == "embedding_unavailable"
    assert "did not answer in time" in raised.value.message


def _drop_last(data: Data) -> Data:
    return data[:-1]


def _short_vector(data: Data) -> Data:
    data[-1]["embedding"] = data[-1]["embedding"][:10]
    return data


def _same_index(data: Data) -> Data:
    return [{**item, "index": 0} for item in data]


def _zero_vector(data: Data) -> Data:
    data[0]["embedding"] = [0.0] * len(data[0]["embedding"])
    return data


@pytest.mark.parametrize("tamper", [_drop_last, _short_vector, _same_index, _zero_vector])
def test_malformed_answers_are_transient_backend_errors(
    fake: FakeEmbeddingsServer, tamper: Callable[[Data], Data]
) -> None:
    fake.tamper = tamper
    with pytest.raises(Transient) as raised:
        http_embedder(fake.url).embed(TEXTS)
    assert raised.value.code == "embedding_backend_error"
    assert "malformed answer" in raised.value.message


def test_a_changed_dimension_is_a_backend_error(fake: FakeEmbeddingsServer) -> None:
    embedder = http_embedder(fake.url)
    embedder.embed(TEXTS[:1])
    fake.tamper = lambda data: [{**d, "embedding": d["embedding"][:128]} for d in data]
    with pytest.raises(Transient) as raised:
        embedder.embed(TEXTS[:1])
    assert raised.value.code == "embedding_backend_error"
    assert "384 dimensions" in raised.value.message
