"""Content-addressed blob store on a local directory: raw uploads and parsed text by sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.errors import Transient


class LocalBlobStore:
    """A `BlobStore`: blobs as files under a directory, fanned out by their first two hex digits."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._staging = root / "staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._root / sha256[:2] / sha256

    def _missing(self, sha256: str) -> Transient:
        return Transient(
            f"blob {sha256} is not in the blob store at {self._root}", code="blob_missing"
        )

    def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes; a missing blob is transient (another node may still be writing)."""
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise self._missing(sha256) from exc

    @contextmanager
    def as_file(self, sha256: str) -> Iterator[Path]:
        """The blob's own file: on a local disk there is nothing to copy."""
        path = self._path(sha256)
        if not path.is_file():
            raise self._missing(sha256)
        yield path

    def ping(self) -> None:
        """Raise if the blob directory is gone."""
        if not self._root.is_dir():
            raise OSError(f"the blob store directory {self._root} does not exist")

    def put_bytes(self, data: bytes) -> str:
        """Store bytes, return their sha256; storing the same bytes twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            fd, name = tempfile.mkstemp(dir=self._staging)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            self.adopt(Path(name), sha256)
        return sha256

    def adopt(self, staged: Path, sha256: str) -> None:
        """Move a fully written temporary file into the store under its sha256."""
        target = self._path(sha256)
        target.parent.mkdir(exist_ok=True)
        if staged.parent != self._staging:
            # Another filesystem, maybe: copy next to the target first, so the rename below
            # stays atomic and readers never see a half-written blob.
            fd, name = tempfile.mkstemp(dir=self._staging)
            os.close(fd)
            shutil.move(staged, name)
            staged = Path(name)
        os.replace(staged, target)

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        self._path(sha256).unlink(missing_ok=True)
