"""One factory per backend: the implementation the settings choose, typed as its Protocol."""

from __future__ import annotations

import threading
from pathlib import Path

from contracts.errors import Permanent, SluiceError, Transient
from contracts.settings import Settings
from stages.backends.protocols import BlobStore, Embedder, VectorIndex


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store `SLUICE_BLOB_STORE_URL` chooses: `s3://bucket/prefix` for any
    S3-compatible store, else a local directory under the data dir."""
    url = settings.blob_store_url
    if url and url.startswith("s3://"):
        from stages.backends.s3_blobs import S3BlobStore

        return S3BlobStore.from_url(url, cache_dir=settings.data_dir / "cache")
    if url:
        raise _unknown("SLUICE_BLOB_STORE_URL", url, "s3://bucket/prefix")
    from stages.backends.blobs import LocalBlobStore

    return LocalBlobStore(settings.blob_dir)


def open_index(settings: Settings) -> VectorIndex:
    """The vector index `SLUICE_INDEX_URL` chooses: `postgresql://…` for pgvector, else
    LanceDB under the data dir."""
    url = settings.index_url
    if url and is_postgres_url(url):
        from stages.backends.pg_index import PgVectorIndex

        return PgVectorIndex(url)
    if url:
        raise _unknown("SLUICE_INDEX_URL", url, "postgresql://user@host/db")
    from stages.backends.lance_index import LanceIndex

    return LanceIndex(settings.index_dir)


def is_postgres_url(url: str) -> bool:
    """Whether a URL names a PostgreSQL database (libpq's two schemes)."""
    return url.startswith(("postgresql://", "postgres://"))


def _unknown(variable: str, url: str, example: str) -> SluiceError:
    scheme = url.split("://", 1)[0] if "://" in url else url[:20]
    return SluiceError(
        f"{variable} has a scheme Sluice does not know ({scheme!r}): use {example}, or unset it "
        "for the embedded default",
        code="usage_error",
    )


def make_embedder(settings: Settings) -> Embedder:
    """The embedder the settings ask for: the endpoint at `embed_url`, else the local model."""
    if settings.embed_url:
        from stages.backends.http_embedder import HttpEmbedder

        return HttpEmbedder(
            settings.embed_url,
            model=settings.embed_model_name,
            api_key=settings.embed_api_key,
            timeout_s=settings.embed_timeout_s,
            batch_size=settings.embed_batch_size,
        )
    return _local_embedder(settings, settings.model_dir)


def local_backend(settings: Settings, model_dir: Path | None = None) -> str:
    """The backend the local model in `model_dir` (None: the packaged one) runs on:
    `SLUICE_EMBED_BACKEND`, where `auto` means torch on CUDA (fp16, large batches) and, on
    CPU, the INT8 ONNX model for the packaged MiniLM, which the benchmark measured several
    times faster than fp32 torch at the same retrieval (bench/int8_quality.py). Any other
    model stays on fp32 torch under `auto`: INT8's quality was measured for MiniLM only."""
    if settings.embed_backend != "auto":
        return settings.embed_backend
    from stages.backends.embedder import pick_device

    if pick_device(settings.embed_device).startswith("cuda") or model_dir is not None:
        return "torch"
    return "onnx-int8"


def _local_embedder(settings: Settings, model_dir: Path | None) -> Embedder:
    """The model in `model_dir` (None: the packaged one) on the backend the settings choose."""
    backend = local_backend(settings, model_dir)
    if backend in ("onnx", "onnx-int8"):
        from stages.backends.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder(model_dir, settings.embed_batch_size, quantized=backend == "onnx-int8")
    from stages.backends.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        model_dir,
        settings.embed_device,
        settings.embed_batch_size,
        cuda_batch_size=settings.embed_cuda_batch_size,
    )


# What a sentence-transformers directory holds: the tokenizer (the chunk stage measures with
# it) and the model's description, as modules (sentence-transformers) or a bare config.
_TOKENIZER_FILE = "tokenizer.json"
_MODEL_FILES = ("modules.json", "config.json")


def resolve_model_dir(settings: Settings, model: str | None) -> Path:
    """The directory of the model a profile names, checked without loading it (None, or the
    deployment's model name: the deployment's); Permanent `unknown_model` if it is none."""
    # Imported here: the embedder module sets the model libraries' environment, which a
    # process that only opens an index or a blob store has no business with.
    from stages.backends.embedder import PACKAGED_MODEL_NAME, packaged_model_dir

    if model is None or model == settings.embed_model_name:
        return settings.model_dir or packaged_model_dir()
    if model == PACKAGED_MODEL_NAME:
        return packaged_model_dir()
    path = Path(model)
    if not path.is_absolute():
        # A relative path would mean another directory to each process that reads it.
        raise Permanent(
            f"the embedding model {model!r} is unknown: name {settings.embed_model_name!r} "
            "(the deployment's model) or the absolute path of a sentence-transformers "
            "directory on the stage hosts",
            code="unknown_model",
        )
    try:
        usable = (path / _TOKENIZER_FILE).is_file() and any(
            (path / name).is_file() for name in _MODEL_FILES
        )
    except OSError:
        usable = False
    if not usable:
        raise Permanent(
            f"{model} is no sentence-transformers model directory this host can read (it "
            f"needs {_TOKENIZER_FILE} and {' or '.join(_MODEL_FILES)}): copy the model there "
            "on every embed and chunk host, or name another one",
            code="unknown_model",
        )
    return path


def is_default_model(settings: Settings, model: str | None) -> bool:
    """Whether a profile's model is the deployment's own (what `make_embedder` builds)."""
    if model is None or model == settings.embed_model_name:
        return True
    if settings.embed_url:
        # The deployment's model is behind an endpoint: a directory is always another one.
        return False
    default = resolve_model_dir(settings, None)
    return resolve_model_dir(settings, model).resolve() == default.resolve()


# Loaded models, per process: a model is hundreds of megabytes and seconds to load, and the
# embed stage and the gateway each need one per generation they serve, not one per message.
_loaded: dict[tuple[object, ...], Embedder] = {}
_loading = threading.Lock()


def embedder_for(settings: Settings, model: str | None) -> Embedder:
    """The embedder of the model a profile names (None: the deployment's), loaded on first
    use and then kept for the process; Permanent `unknown_model` if it cannot be loaded."""
    default = is_default_model(settings, model)
    path = None if default else resolve_model_dir(settings, model).resolve()
    key: tuple[object, ...] = (
        path or "default",
        settings.embed_url if default else None,
        settings.embed_model_name if default else None,
        settings.model_dir if default else None,
        settings.embed_backend,
        settings.embed_device,
        settings.embed_batch_size,
    )
    found = _loaded.get(key)
    if found is not None:
        return found
    # One load at a time: two messages naming a new model at once load it once.
    with _loading:
        if key not in _loaded:
            _loaded[key] = make_embedder(settings) if path is None else _load(settings, path)
        return _loaded[key]


def _load(settings: Settings, path: Path) -> Embedder:
    """The model at `path`, or Permanent `unknown_model` saying why it would not load."""
    try:
        return _local_embedder(settings, path)
    except (Transient, MemoryError):
        raise
    except SluiceError as exc:
        raise Permanent(exc.message, code=exc.code) from exc
    except Exception as exc:  # what a broken model raises depends on the library and file
        if "out of memory" in str(exc).lower():
            raise
        cause = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise Permanent(
            f"the embedding model at {path} could not be loaded ({cause}): check that it is a "
            "complete sentence-transformers directory, or name another model",
            code="unknown_model",
        ) from exc
