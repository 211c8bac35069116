"""The embed stage on CUDA holds two full model calls' worth of messages, so the GPU never
waits for the broker; on CPU its tuning is what it always was, and an operator's value wins.

Also the embedder's own GPU choices, checked on CPU: the forward-pass size per device, and
half precision handing back unit-length float32 vectors (CUDA runs the same code path).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from contracts.pipeline import BUILTIN
from contracts.settings import Settings
from stages.backends.embedder import (
    CUDA_BATCH_SIZE,
    SentenceTransformerEmbedder,
    forward_batch_size,
)

SetEnv = Callable[..., None]
TEXTS = [
    "The tide pools along the rocky shore fill at every high tide.",
    "Copper prices rose for a third week as mines cut their output.",
    "A long report on the harbour " * 40,
    "x",
]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> SetEnv:
    """A clean slate of `SLUICE_*` variables; returns a function that sets some."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_on_cpu_the_embed_stage_keeps_its_own_tuning(env: SetEnv) -> None:
    env(SLUICE_EMBED_DEVICE="cpu", SLUICE_EMBED_CALL_CHUNKS="4096")
    embed = Settings().stage("embed")
    spec = BUILTIN["embed"]
    assert (embed.prefetch, embed.concurrency) == (spec.prefetch, spec.concurrency)


def test_on_cuda_the_embed_stage_holds_two_model_calls(env: SetEnv) -> None:
    # 2 calls x 4096 chunks / 64 chunks a message: 128 messages, each worked on at once.
    env(SLUICE_EMBED_DEVICE="cuda", SLUICE_EMBED_CALL_CHUNKS="4096")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (128, 128)
    # Fewer chunks a message mean more messages for the same two calls (cuda:N counts too).
    env(SLUICE_EMBED_DEVICE="cuda:1", SLUICE_CHUNKS_PER_MESSAGE="16")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (512, 512)
    # Other stages are not the GPU's.
    assert Settings().stage("index").prefetch == BUILTIN["index"].prefetch


def test_the_stage_s_own_prefetch_stands_when_it_already_holds_two_calls(env: SetEnv) -> None:
    # At the defaults two calls are 2 x 512 / 64 = 16 messages; the stage holds 32 anyway.
    env(SLUICE_EMBED_DEVICE="cuda")
    embed = Settings().stage("embed")
    spec = BUILTIN["embed"]
    assert (embed.prefetch, embed.concurrency) == (spec.prefetch, spec.concurrency)


def test_an_explicit_embed_setting_wins_on_cuda(env: SetEnv) -> None:
    env(SLUICE_EMBED_DEVICE="cuda", SLUICE_EMBED_CALL_CHUNKS="4096", SLUICE_EMBED_PREFETCH="8")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (8, 8)
    env(SLUICE_EMBED_CONCURRENCY="4")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (8, 4)


def test_auto_is_cuda_only_where_loaded_torch_sees_a_gpu(
    env: SetEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env(SLUICE_EMBED_CALL_CHUNKS="4096")  # SLUICE_EMBED_DEVICE: auto
    gpu = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", gpu)
    assert Settings().stage("embed").prefetch == 128
    # A torch that sees no GPU (this machine's, or none loaded at all) leaves the default.
    monkeypatch.setitem(
        sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    )
    assert Settings().stage("embed").prefetch == BUILTIN["embed"].prefetch
    monkeypatch.delitem(sys.modules, "torch")
    assert Settings().stage("embed").prefetch == BUILTIN["embed"].prefetch


def test_a_model_elsewhere_is_never_sized_for_a_gpu(env: SetEnv) -> None:
    env(SLUICE_EMBED_DEVICE="cuda", SLUICE_EMBED_CALL_CHUNKS="4096", SLUICE_EMBED_BACKEND="onnx")
    assert Settings().stage("embed").prefetch == BUILTIN["embed"].prefetch
    env(SLUICE_EMBED_BACKEND="torch", SLUICE_EMBED_URL="http://127.0.0.1:9/v1")
    assert Settings().stage("embed").prefetch == BUILTIN["embed"].prefetch


def test_forward_passes_are_large_on_cuda_only() -> None:
    assert forward_batch_size("cuda", 16, CUDA_BATCH_SIZE) == CUDA_BATCH_SIZE
    assert forward_batch_size("cuda:1", 16, 512) == 512
    assert forward_batch_size("cpu", 16, 512) == 16
    assert Settings().embed_cuda_batch_size == CUDA_BATCH_SIZE


def test_cpu_vectors_are_the_model_s_own_float32_rows() -> None:
    embedder = SentenceTransformerEmbedder(None, "cpu", 16)
    assert not embedder.half and embedder.batch_size == 16
    got = embedder.embed(TEXTS)
    want = embedder.model.encode(
        TEXTS, batch_size=16, normalize_embeddings=True, convert_to_numpy=True
    )
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), embedder.dimensions)
    assert np.array_equal(got, want)
    assert embedder.embed([]).shape == (0, embedder.dimensions)


def test_half_precision_vectors_are_unit_float32_and_near_full_precision() -> None:
    full = SentenceTransformerEmbedder(None, "cpu", 16).embed(TEXTS)
    half = SentenceTransformerEmbedder(None, "cpu", 16, half=True)
    got = half.embed(TEXTS)
    assert got.dtype == np.float32 and got.shape == full.shape
    # fp16's own normalisation is 3e-4 off unit length; the float32 one is at rounding.
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-6
    assert (got * full).sum(axis=1).min() > 0.999
