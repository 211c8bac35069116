"""The ONNX Runtime embedder against sentence-transformers, both on the packaged model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from contracts.settings import Settings
from stages.backends import onnx_embedder
from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.factory import make_embedder
from stages.backends.http_embedder import HttpEmbedder
from stages.backends.onnx_embedder import (
    INT8_RECIPE,
    OnnxEmbedder,
    QuantizeRecipe,
    export_onnx,
    int8_path,
    load_tokenizer,
    quantize_onnx,
)

LONG = " ".join(
    f"Paragraph {n} of the harbour ledger records copper, timber and salt unloaded at dawn."
    for n in range(40)
)
TEXTS = [
    "Tidal pools hold anemones, crabs and small fish.",
    ".",
    LONG,
    "The lighthouse keeper logged every passing ship, its flag, its cargo and the weather.",
    "Sourdough needs a lively starter and patience.",
    "Copper was mined in Cornwall for centuries; the engine houses still stand on the cliffs.",
    "Invoice 4471: 12 crates of walnuts, delivered to the warehouse on Tuesday.",
    "A short one.",
    "Wie spät ist es? Il est huit heures. 今何時ですか",
    "The council approved the railway station's new timetable after a long debate about the "
    "early trains, the late buses and the bakery that opens at five.",
    "ok",
    "Glaciers carve valleys slowly, leaving moraines and hanging valleys behind them.",
    "Section 3.2 — Margins fell as supplier costs rose faster than revenue through the winter.",
    "Falcons nest on the quarry ledge every spring.",
    "   padded with spaces   ",
    "The museum's archive holds ribbons, candles, journals and a brass compass from 1851.",
    "Patients at the rural clinic waited less after the schedule was changed.",
    "Why do kettles whistle? Steam forced through a narrow opening makes the whistle vibrate.",
    "Harvest festival: bread, apples, pepper, honey and a parade through the village.",
    "Thunder rolled over the basalt cliffs as the fishing boats hurried back to harbour.",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="module")
def onnx(cache_root: Path) -> OnnxEmbedder:
    # Small batches, so that sorting by length moves texts across batches.
    return OnnxEmbedder(None, 4, cache_root / "sluice" / "onnx")


@pytest.fixture(scope="module")
def int8(onnx: OnnxEmbedder) -> OnnxEmbedder:
    # After `onnx`, in its cache: quantised from that export, not from one of its own.
    return OnnxEmbedder(None, 4, onnx.model_path.parent.parent, quantized=True)


@pytest.fixture(scope="module")
def torch_model() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(None, "cpu", 64)


def test_vectors_match_sentence_transformers_in_order_and_are_unit_length(
    onnx: OnnxEmbedder, torch_model: SentenceTransformerEmbedder
) -> None:
    untruncated = Tokenizer.from_file(str(onnx.model_dir / "tokenizer.json"))
    untruncated.no_truncation()
    assert len(untruncated.encode(LONG).ids) > 256
    assert len(load_tokenizer(onnx.model_dir).encode(LONG).ids) == 256
    got = np.array(onnx.embed(TEXTS))
    want = np.array(torch_model.embed(TEXTS))
    assert got.shape == want.shape == (len(TEXTS), onnx.dimensions)
    assert onnx.dimensions == torch_model.dimensions == 384
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (got * want).sum(axis=1)
    # Stricter than "same quality" needs: a truncation one token short already falls below.
    assert cosines.min() >= 0.9999, dict(zip(TEXTS, cosines.round(5).tolist(), strict=True))
    # Each vector is nearest to its own text's reference: nothing was swapped by the sorting.
    assert ((got @ want.T).argmax(axis=1) == np.arange(len(TEXTS))).all()


def test_a_text_gets_the_same_vector_whatever_its_batch(onnx: OnnxEmbedder) -> None:
    together = np.array(onnx.embed(TEXTS))
    alone = np.array([onnx.embed([t])[0] for t in reversed(TEXTS)])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert onnx.embed([]).shape == (0, onnx.dimensions)


def test_a_second_embedder_reuses_the_cached_export(onnx: OnnxEmbedder) -> None:
    before = onnx.model_path.stat().st_mtime_ns
    again = OnnxEmbedder(None, 8, onnx.model_path.parent.parent)
    assert again.model_path == onnx.model_path
    assert onnx.model_path.stat().st_mtime_ns == before
    # Nothing new beside the export (the INT8 file may be there, made by its own fixture).
    assert {p.name for p in onnx.model_path.parent.iterdir()} <= {
        "model.onnx",
        int8_path(onnx.model_path).name,
    }


def test_a_failed_export_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx: OnnxEmbedder
) -> None:
    def half_written(model_dir: Path, path: Path) -> None:
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_embedder, "_trace_to", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(onnx.model_dir, tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_settings_choose_the_backend_and_an_endpoint_still_wins(
    onnx: OnnxEmbedder, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))  # The export the fixture made.
    monkeypatch.setenv("SLUICE_EMBED_BACKEND", "onnx")
    assert Settings().embed_backend == "onnx"
    embedder = make_embedder(Settings())
    assert isinstance(embedder, OnnxEmbedder)
    assert embedder.model_path == onnx.model_path
    remote = make_embedder(Settings(embed_url="http://127.0.0.1:9"))
    assert isinstance(remote, HttpEmbedder)
    remote.close()


def test_int8_vectors_are_unit_length_and_close_to_fp32_torch(
    int8: OnnxEmbedder, torch_model: SentenceTransformerEmbedder
) -> None:
    got = int8.embed(TEXTS)
    want = np.array(torch_model.embed(TEXTS))
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384) == want.shape
    assert int8.dimensions == 384
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (got * want).sum(axis=1)
    # Measured on these texts: min 0.965 ("ok"), mean 0.990; on the benchmark corpus's 1377
    # chunks (bench/int8_quality.py) min 0.983, mean 0.991. Per-tensor QInt8 weights fell to
    # 0.83 on generated chunks: these floors catch a recipe as bad as that.
    assert cosines.min() >= 0.95, dict(zip(TEXTS, cosines.round(4).tolist(), strict=True))
    assert cosines.mean() >= 0.98
    assert ((got @ want.T).argmax(axis=1) == np.arange(len(TEXTS))).all()


def test_the_int8_file_is_made_once_beside_the_export_and_reused(
    int8: OnnxEmbedder, onnx: OnnxEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert int8.model_path == int8_path(onnx.model_path)
    assert int8.model_path.parent == onnx.model_path.parent
    before = int8.model_path.stat()

    def never(fp32: Path, path: Path, recipe: QuantizeRecipe) -> None:
        raise AssertionError("quantised again")

    monkeypatch.setattr(onnx_embedder, "_quantize_to", never)
    again = OnnxEmbedder(None, 8, onnx.model_path.parent.parent, quantized=True)
    assert again.model_path == int8.model_path
    after = int8.model_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_changed_recipe_names_another_file() -> None:
    fp32 = Path("/cache/0123abcd/model.onnx")
    changed = [
        replace(INT8_RECIPE, weight_type="QUInt8"),
        replace(INT8_RECIPE, per_channel=not INT8_RECIPE.per_channel),
        replace(INT8_RECIPE, reduce_range=not INT8_RECIPE.reduce_range),
        replace(INT8_RECIPE, op_types=("MatMul", "Gather")),
    ]
    paths = {int8_path(fp32, recipe) for recipe in [INT8_RECIPE, *changed]}
    assert len(paths) == 1 + len(changed)
    assert {p.parent for p in paths} == {fp32.parent}
    assert int8_path(fp32, QuantizeRecipe()) == int8_path(fp32)


def test_a_failed_quantisation_leaves_nothing_behind(
    onnx: OnnxEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(fp32: Path, path: Path, recipe: QuantizeRecipe) -> None:
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_embedder, "_quantize_to", half_written)
    recipe = replace(INT8_RECIPE, reduce_range=True)
    folder = onnx.model_path.parent
    files = set(folder.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_onnx(onnx.model_dir, folder.parent, recipe)
    assert set(folder.iterdir()) == files
    assert not int8_path(onnx.model_path, recipe).exists()


def test_onnx_int8_in_the_settings_picks_the_quantised_model(
    int8: OnnxEmbedder, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))  # The files the fixtures made.
    monkeypatch.setenv("SLUICE_EMBED_BACKEND", "onnx-int8")
    embedder = make_embedder(Settings())
    assert isinstance(embedder, OnnxEmbedder)
    assert embedder.model_path == int8.model_path
