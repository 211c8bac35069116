"""The ONNX Runtime embedder against sentence-transformers, both on the packaged model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from contracts.settings import Settings
from stages.backends import onnx_embedder
from stages.backends.embedder import SentenceTransformerEmbedder
from stages.backends.factory import make_embedder
from stages.backends.http_embedder import HttpEmbedder
from stages.backends.onnx_embedder import OnnxEmbedder, export_onnx, load_tokenizer

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
    assert onnx.embed([]) == []


def test_a_second_embedder_reuses_the_cached_export(onnx: OnnxEmbedder) -> None:
    before = onnx.model_path.stat().st_mtime_ns
    again = OnnxEmbedder(None, 8, onnx.model_path.parent.parent)
    assert again.model_path == onnx.model_path
    assert onnx.model_path.stat().st_mtime_ns == before
    assert [p.name for p in onnx.model_path.parent.iterdir()] == ["model.onnx"]


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
