"""Content-addressed blob store on any S3-compatible object store (AWS S3, MinIO, Ceph).

Chosen by `SLUICE_BLOB_STORE_URL=s3://bucket/prefix`. Where the store is and who we are come
only from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) and boto3's usual chain, so an operator configures
Sluice like every other S3 client. Only standard S3 calls are made.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from contracts.errors import SluiceError, StorageFull, Transient, is_disk_full
from stages.backends.protocols import check_note_name

MiB = 1024 * 1024

# Files above 8 MiB go up and down in 8 MiB parts, 4 at a time: memory stays at a few parts
# whatever the blob's size, and a failed part is retried alone.
TRANSFER = TransferConfig(
    multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4
)

# A blackholed endpoint should fail a call in seconds, not after botocore's 60 s connect
# timeout times its retries; the runtime retries a `Transient` with its own backoff. The pool
# is larger than the default 10 so a stage's threads and a transfer's workers share it
# without discarding connections.
CLIENT_CONFIG = Config(connect_timeout=10, max_pool_connections=32)

# What S3 answers for an absent key: HEAD has no body, so only its status says so.
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """A `BlobStore`: blobs as objects `<prefix>/<sha[:2]>/<sha>` in one bucket."""

    def __init__(self, bucket: str, prefix: str = "", *, cache_dir: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._cache_dir = cache_dir
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        # A session of our own: boto3's default session is shared and not thread-safe, while
        # the client made from it is, so every thread of this process uses this one client.
        # botocore reads AWS_DEFAULT_REGION but not AWS_REGION, which Sluice documents (as the
        # other AWS SDKs do), so that one is handed over here; the rest boto3 reads itself.
        session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
        self._client: Any = session.client("s3", config=CLIENT_CONFIG)
        self.endpoint: str = self._client.meta.endpoint_url

    @classmethod
    def from_url(cls, url: str, *, cache_dir: Path) -> S3BlobStore:
        """The store `s3://bucket/prefix` names; downloads for `as_file` go under `cache_dir`."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise SluiceError(
                f"SLUICE_BLOB_STORE_URL {url!r} is not an S3 location: use s3://bucket/prefix "
                "(the endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and AWS_REGION)",
                code="usage_error",
            )
        return cls(parts.netloc, parts.path, cache_dir=cache_dir)

    def key(self, sha256: str) -> str:
        """The object key of a blob; `ValueError` if `sha256` is not a hex digest."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        name = f"{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put_bytes(self, data: bytes) -> str:
        """Store bytes, return their sha256; storing the same bytes twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            with self._translated():
                self._client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data)
        return sha256

    def adopt(self, staged: Path, sha256: str) -> None:
        """Upload a fully written temporary file under its sha256, then remove it.

        The upload streams from disk (multipart above 8 MiB). A blob already stored is not
        sent again. If the upload fails the file stays, so the caller may retry or clean up.
        """
        key = self.key(sha256)
        if not self.exists(sha256):
            with self._translated():
                self._client.upload_file(str(staged), self.bucket, key, Config=TRANSFER)
        staged.unlink(missing_ok=True)

    def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes; a missing blob is transient (another node may still be writing)."""
        key = self.key(sha256)
        with self._translated(sha256):
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = answer["Body"].read()
        return data

    @contextmanager
    def as_file(self, sha256: str) -> Iterator[Path]:
        """A downloaded copy of the blob under the cache dir, removed when the block ends."""
        key = self.key(sha256)
        fd, name = tempfile.mkstemp(dir=self._cache_dir, prefix=f"{sha256[:12]}-")
        os.close(fd)
        path = Path(name)
        try:
            with self._translated(sha256), self._local_disk_full_is_transient(sha256):
                self._client.download_file(self.bucket, key, name, Config=TRANSFER)
            yield path
        finally:
            path.unlink(missing_ok=True)

    @contextmanager
    def _local_disk_full_is_transient(self, sha256: str) -> Iterator[None]:
        """A full cache disk (this machine's, not the bucket) as `StorageFull`, retried until
        there is space. S3 has no standard answer for a full bucket: what a store answers
        then stays `blob_store_unavailable`, retried like any outage."""
        try:
            yield
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise StorageFull(
                f"the blob cache at {self._cache_dir} has no space left for a copy of blob "
                f"{sha256} ({exc.strerror}); free space on its disk (SLUICE_DATA_DIR): the "
                "work waits, and is retried until it fits"
            ) from exc

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        key = self.key(sha256)
        with self._translated():
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in NOT_FOUND:
                    return False
                raise
        return True

    def delete(self, sha256: str) -> None:
        """Remove a blob if present (S3 answers a delete of an absent key with success)."""
        key = self.key(sha256)
        with self._translated():
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def note_key(self, name: str) -> str:
        """The object key of a note; `ValueError` if `name` cannot name one."""
        key = f"notes/{check_note_name(name)}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_note(self, name: str, data: bytes) -> None:
        """Store `data` under `name`, replacing what was there (a PUT is atomic in S3)."""
        with self._translated():
            self._client.put_object(Bucket=self.bucket, Key=self.note_key(name), Body=data)

    def read_note(self, name: str) -> bytes | None:
        """The note's bytes, or None if there is none."""
        with self._translated():
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=self.note_key(name))
            except ClientError as exc:
                if _code(exc) in NOT_FOUND:
                    return None
                raise
            data: bytes = answer["Body"].read()
        return data

    def delete_note(self, name: str) -> None:
        """Remove a note if present."""
        with self._translated():
            self._client.delete_object(Bucket=self.bucket, Key=self.note_key(name))

    def delete_notes(self, prefix: str) -> None:
        """Remove every note whose name starts with `prefix` (listed, then deleted by key)."""
        start = self.note_key(prefix)
        with self._translated():
            pages = self._client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=start):
                for found in page.get("Contents", []):
                    self._client.delete_object(Bucket=self.bucket, Key=found["Key"])

    def ping(self) -> None:
        """Raise `Transient` if the bucket cannot be reached with these credentials."""
        with self._translated():
            self._client.head_bucket(Bucket=self.bucket)

    @contextmanager
    def _translated(self, sha256: str | None = None) -> Iterator[None]:
        """Turn boto's errors into Sluice's: a missing blob, or a store that cannot be used.

        Only reads name `sha256`: for them an absent key means the blob is not there (yet);
        for a write it can only mean the bucket is absent.
        """
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as raised:
            exc = _underlying(raised)
            if sha256 is not None and isinstance(exc, ClientError) and _code(exc) in NOT_FOUND:
                raise Transient(
                    f"blob {sha256} is not in the S3 blob store (bucket {self.bucket!r}, "
                    f"key {self.key(sha256)!r} at {self.endpoint})",
                    code="blob_missing",
                ) from raised
            raise Transient(
                f"the S3 blob store (bucket {self.bucket!r} at {self.endpoint}) cannot be "
                f"used: {_describe(exc)}. {_hint(exc)}",
                code="blob_store_unavailable",
            ) from raised


def _underlying(exc: Exception) -> Exception:
    # boto3's upload_file re-raises a ClientError as S3UploadFailedError, losing its code;
    # the original is still its context.
    context = exc.__context__
    if isinstance(exc, Boto3Error) and isinstance(context, ClientError | BotoCoreError):
        original: Exception = context
        return original
    return exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    # Built from the error's code, status and operation, never from the request, so a
    # message cannot carry a credential; S3 error codes are what an operator searches for.
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        message = exc.response.get("Error", {}).get("Message") or "no message"
        return f"{exc.operation_name} answered {_code(exc) or status} (HTTP {status}): {message}"
    return f"{type(exc).__name__}: {exc}"


def _hint(exc: Exception) -> str:
    """What a person should check, by the kind of failure."""
    code = _code(exc) if isinstance(exc, ClientError) else ""
    if code in {"NoSuchBucket", "404"}:
        return "Create the bucket, or fix the bucket named in SLUICE_BLOB_STORE_URL."
    if code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return (
            "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and the bucket's policy (Sluice "
            "needs s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket)."
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or another boto3 credential)."
    if isinstance(exc, BotoConnectionError):
        return "Check AWS_ENDPOINT_URL and that the object store is running and reachable."
    return "Sluice retries the work; if this persists, check the object store's health."
