"""Content-addressed blob store: raw uploads and parsed text, named by their sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from contracts.errors import Transient


class BlobStore(Protocol):
    """Where large payloads live so messages only carry their sha256 (claim-check)."""

    def path(self, sha256: str) -> Path:
        """A local path to read the blob from."""
        ...

    def put_bytes(self, data: bytes) -> str:
        """Store bytes, return their sha256; storing the same bytes twice is a no-op."""
        ...

    def adopt(self, staged: Path, sha256: str) -> None:
        """Move a fully written temporary file into the store under its sha256."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        ...


class LocalBlobStore:
    """Blobs as files under a directory, fanned out by the first two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """A local path to read the blob from."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes; a missing blob is transient (another node may still be writing)."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise Transient(f"blob {sha256} is not in the blob store at {self.root}") from exc

    def put_bytes(self, data: bytes) -> str:
        """Store bytes, return their sha256; storing the same bytes twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            fd, name = tempfile.mkstemp(dir=self.staging)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            self.adopt(Path(name), sha256)
        return sha256

    def adopt(self, staged: Path, sha256: str) -> None:
        """Move a fully written temporary file into the store under its sha256."""
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        # rename is atomic on one filesystem: readers never see a half-written blob.
        os.replace(staged, target)

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self.path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        self.path(sha256).unlink(missing_ok=True)


async def stream_to_staging(
    chunks: AsyncIterator[bytes], staging: Path, limit_bytes: int
) -> tuple[Path, str, int]:
    """Write a stream to a staging file, hashing as it goes; stops past `limit_bytes`.

    Returns the file, its sha256 and its size; a size above the limit means the caller
    must reject the upload (the file is already removed then).
    """
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(dir=staging)
    path = Path(name)
    with os.fdopen(fd, "wb") as out:
        async for piece in chunks:
            size += len(piece)
            if size > limit_bytes:
                break
            digest.update(piece)
            out.write(piece)
    if size > limit_bytes:
        path.unlink(missing_ok=True)
    return path, digest.hexdigest(), size
