"""One factory per backend: the implementation the settings choose, typed as its Protocol."""

from __future__ import annotations

from contracts.settings import Settings
from stages.backends.protocols import BlobStore, Embedder, VectorIndex


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings choose (today: a local directory under the data dir)."""
    from stages.backends.blobs import LocalBlobStore

    return LocalBlobStore(settings.blob_dir)


def open_index(settings: Settings) -> VectorIndex:
    """The vector index the settings choose (today: LanceDB under the data dir)."""
    from stages.backends.lance_index import LanceIndex

    return LanceIndex(settings.index_dir)


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
    if settings.embed_backend == "onnx":
        from stages.backends.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder(settings.model_dir, settings.embed_batch_size)
    from stages.backends.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        settings.model_dir, settings.embed_device, settings.embed_batch_size
    )
