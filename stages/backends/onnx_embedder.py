"""Sentence embeddings on ONNX Runtime: the model exported once, fp32 or INT8, run without torch."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from contracts.errors import SluiceError
from stages.backends.embedder import max_seq_length, packaged_model_dir

if TYPE_CHECKING:
    import onnxruntime as ort
    from tokenizers import Encoding, Tokenizer

# Part of the cache key: change it whenever the exported graph would differ (opset, inputs,
# attention implementation), so an old export is never reused for a new recipe.
EXPORT_RECIPE = "bert-last-hidden-state/opset17/eager-attention/v1"
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class QuantizeRecipe:
    """How the fp32 export is quantised to INT8; every field is part of the file's name.

    `quantize_dynamic` is called with exactly these fields, so a changed recipe cannot reuse
    an old file by someone forgetting to bump a version string. Chosen on an AVX-512 VNNI CPU
    against torch fp32 on 400 generated chunks: per-channel QInt8 weights kept cosine >= 0.98,
    per-tensor ones fell to 0.83; QUInt8 weights ran 5-6x slower (ONNX Runtime's fast x86
    kernels take signed weights) for no better vectors; `reduce_range` (7 bits, for CPUs
    without VNNI) lost a little (mean 0.986 against 0.991). MatMul only leaves the embedding
    table's Gather in fp32, a hair closer (mean 0.9911 against 0.9906). `quant_pre_process`
    gave the same vectors, ran slower here, and its symbolic shape inference fails on this
    export, so it is not run.
    """

    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)

    def key(self) -> str:
        """A short digest of the recipe, for the quantised file's name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """The recipe in words, e.g. `QInt8 per-channel` (for reports)."""
        return f"{self.weight_type} {'per-channel' if self.per_channel else 'per-tensor'}"


def _has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 or AVX): without it, ONNX Runtime's u8s8 kernels
    can saturate on full 8-bit weights, and its quantisation guide asks for `reduce_range`."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# The recipe for this machine: a machine without VNNI quantises (and caches) its own file.
INT8_RECIPE = QuantizeRecipe(reduce_range=not _has_vnni())


def default_cache_dir() -> Path:
    """Where exports are kept: `$XDG_CACHE_HOME/sluice/onnx`, else `~/.cache/sluice/onnx`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sluice" / "onnx"


def model_key(model_dir: Path) -> str:
    """A short digest of the model's config, weights and the export recipe: its cache folder."""
    weights = next((model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()), None)
    if weights is None:
        raise SluiceError(
            f"no model weights ({' or '.join(WEIGHT_FILES)}) in {model_dir}: point "
            "SLUICE_MODEL_DIR at a sentence-transformers directory, or unset it for the packaged "
            "one",
            code="model_not_found",
        )
    digest = hashlib.sha256(EXPORT_RECIPE.encode())
    digest.update((model_dir / "config.json").read_bytes())
    with weights.open("rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def export_onnx(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """The model's ONNX export under `cache_dir/<key>/model.onnx`, made now only if missing."""
    target = (cache_dir or default_cache_dir()) / model_key(model_dir) / "model.onnx"
    return _made_once(target, lambda tmp: _trace_to(model_dir, tmp))


def int8_path(fp32_path: Path, recipe: QuantizeRecipe = INT8_RECIPE) -> Path:
    """Where the INT8 model quantised from `fp32_path` by `recipe` is kept: beside it."""
    return fp32_path.with_name(f"model-int8-{recipe.key()}.onnx")


def quantize_onnx(
    model_dir: Path, cache_dir: Path | None = None, recipe: QuantizeRecipe = INT8_RECIPE
) -> Path:
    """The model's INT8 ONNX file (the fp32 export, quantised), made now only if missing."""
    fp32 = export_onnx(model_dir, cache_dir)
    return _made_once(int8_path(fp32, recipe), lambda tmp: _quantize_to(fp32, tmp, recipe))


def _made_once(target: Path, make: Callable[[Path], None]) -> Path:
    """`target`, written by `make(temporary path)` and renamed into place if it is missing."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write a private temporary file and rename it into place: a process that starts while
    # another is writing either sees no file (and writes it too) or a complete one, never half.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".model-", suffix=".onnx.tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        make(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private; the cache may be shared by every user of the machine.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _quantize_to(fp32: Path, path: Path, recipe: QuantizeRecipe) -> None:
    """Dynamic INT8 quantisation: weights stored as 8-bit, activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32,
        path,
        op_types_to_quantize=list(recipe.op_types),
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        weight_type=QuantType[recipe.weight_type],
    )


def _trace_to(model_dir: Path, path: Path) -> None:
    """Trace the transformer (inputs → last hidden state) with torch's TorchScript exporter."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # Eager attention traces to plain MatMul/Softmax, which ONNX Runtime ran on about a quarter
    # less CPU time than the graph traced from SDPA (with its extra mask Where/Gather nodes).
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    # A padded row in the example, so the mask is traced as data and not folded into a constant.
    input_ids = torch.full((2, 16), 1000, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer's warnings are about shapes and Python branches it freezes; whether the
        # result is right is checked against sentence-transformers by the unit tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHiddenState(),
            (input_ids, attention_mask, torch.zeros_like(input_ids)),
            str(path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def open_session(path: Path) -> ort.InferenceSession:
    """A CPU session using every core this process may run on, one model call at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle workers would otherwise spin for the next call, burning CPU that the event loop and
    # the other stage processes need; spinning won only ~3% in a benchmark running alone.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's fast tokenizer, truncating at its `max_seq_length` and never padding."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json ships with fixed padding and truncation at 128; sentence-transformers
    # truncates at max_seq_length (256 for MiniLM) instead, and we pad per batch ourselves.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length(model_dir))
    return tokenizer


class OnnxEmbedder:
    """An `Embedder` running the exported model on ONNX Runtime's CPU provider.

    `quantized` runs the INT8 file (`quantize_onnx`) instead of the fp32 export: the same
    tokenizer, pooling and inputs, only the graph's weights differ.
    """

    def __init__(
        self,
        model_dir: Path | None,
        batch_size: int,
        cache_dir: Path | None = None,
        *,
        quantized: bool = False,
    ) -> None:
        self.model_dir = model_dir or packaged_model_dir()
        _require_mean_pooling(self.model_dir)
        self.batch_size = batch_size
        make = quantize_onnx if quantized else export_onnx
        self.model_path = make(self.model_dir, cache_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.session = open_session(self.model_path)
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One unit-length vector per text, in order: the rows of a float32 (n, dim) array."""
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        # Batches of similar lengths waste little on padding; results go back to input order.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids), reverse=True)
        vectors: npt.NDArray[np.float32] | None = None
        for start in range(0, len(order), self.batch_size):
            picked = order[start : start + self.batch_size]
            pooled = self._embed_batch([encodings[i] for i in picked])
            if vectors is None:
                vectors = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            vectors[picked] = pooled
        assert vectors is not None
        return vectors

    def _embed_batch(self, encodings: list[Encoding]) -> npt.NDArray[np.float32]:
        longest = max(len(e.ids) for e in encodings)
        input_ids = np.zeros((len(encodings), longest), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        token_type_ids = np.zeros_like(input_ids)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            input_ids[row, :n] = encoding.ids
            attention_mask[row, :n] = encoding.attention_mask
            token_type_ids[row, :n] = encoding.type_ids
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        hidden: npt.NDArray[np.float32] = self.session.run(["last_hidden_state"], feeds)[0]
        return mean_pool_normalised(hidden, attention_mask)


def mean_pool_normalised(
    hidden: npt.NDArray[np.float32], attention_mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Mean of the unmasked token vectors, scaled to unit length (as sentence-transformers does)."""
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = (hidden * mask).sum(axis=1)
    means = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = means / np.clip(norms, 1e-12, None)
    return unit


def _require_mean_pooling(model_dir: Path) -> None:
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
        raise SluiceError(
            f"the model in {model_dir} does not use mean pooling, the only one the ONNX backend "
            "implements: use SLUICE_EMBED_BACKEND=torch for it",
            code="model_not_supported",
        )


if __name__ == "__main__":
    # `python -m stages.backends.onnx_embedder`: make the packaged model's exports now (the
    # fp32 one and its INT8 quantisation), so the first embed stage to start finds them cached.
    model = packaged_model_dir()
    print(quantize_onnx(model))
