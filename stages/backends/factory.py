"""One factory per backend: the implementation the settings choose, typed as its Protocol."""

from __future__ import annotations

from contracts.errors import SluiceError
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
    if settings.embed_backend == "onnx":
        from stages.backends.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder(settings.model_dir, settings.embed_batch_size)
    from stages.backends.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        settings.model_dir, settings.embed_device, settings.embed_batch_size
    )
