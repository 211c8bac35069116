"""Content-addressed blob store on a local directory: raw uploads and parsed text by sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.errors import StorageFull, Transient, is_disk_full
from stages.backends.protocols import check_note_name


class LocalBlobStore:
    """A `BlobStore`: blobs as files under a directory, fanned out by their first two hex digits."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._staging = root / "staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._notes = root / "notes"

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
            with self._full_disk_is_transient(sha256), self._temporary() as temporary:
                temporary.write_bytes(data)
                os.replace(temporary, self._parent_of(sha256) / sha256)
        return sha256

    def adopt(self, staged: Path, sha256: str) -> None:
        """Move a fully written temporary file into the store under its sha256.

        On a full disk (`StorageFull`) nothing is stored under the sha256, and `staged` is
        still there for the caller to retry with or remove.
        """
        with self._full_disk_is_transient(sha256):
            target = self._parent_of(sha256) / sha256
            if staged.parent == self._staging:
                os.replace(staged, target)
                return
            # Another filesystem, maybe: move it next to the target first (a copy, if it must
            # be), so the rename below stays atomic and readers never see a half-written blob.
            with self._temporary() as temporary:
                shutil.move(staged, temporary)
                os.replace(temporary, target)

    def _parent_of(self, sha256: str) -> Path:
        """The directory a blob goes in, made if it is not there yet."""
        parent = self._path(sha256).parent
        parent.mkdir(exist_ok=True)
        return parent

    @contextmanager
    def _temporary(self) -> Iterator[Path]:
        """A new file in the staging directory, removed at the end unless it was moved on:
        a write a full disk cut short leaves nothing behind."""
        fd, name = tempfile.mkstemp(dir=self._staging)
        os.close(fd)
        temporary = Path(name)
        try:
            yield temporary
        finally:
            temporary.unlink(missing_ok=True)

    @contextmanager
    def _full_disk_is_transient(self, sha256: str) -> Iterator[None]:
        """ENOSPC and EDQUOT as `StorageFull`, which the runtime retries until space returns."""
        try:
            yield
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise StorageFull(
                f"the blob store at {self._root} has no space left for blob {sha256} "
                f"({exc.strerror}); free space on its disk: the work waits, and is retried "
                "until it fits",
            ) from exc

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove a blob if present."""
        self._path(sha256).unlink(missing_ok=True)

    def put_note(self, name: str, data: bytes) -> None:
        """Store `data` under `name`, replacing what was there (renamed into place whole)."""
        target = self._notes / check_note_name(name)
        with self._full_disk_is_transient(name), self._temporary() as temporary:
            temporary.write_bytes(data)
            self._notes.mkdir(exist_ok=True)
            os.replace(temporary, target)

    def read_note(self, name: str) -> bytes | None:
        """The note's bytes, or None if there is none."""
        try:
            return (self._notes / check_note_name(name)).read_bytes()
        except FileNotFoundError:
            return None

    def delete_note(self, name: str) -> None:
        """Remove a note if present."""
        (self._notes / check_note_name(name)).unlink(missing_ok=True)

    def delete_notes(self, prefix: str) -> None:
        """Remove every note whose name starts with `prefix`."""
        check_note_name(prefix)
        if self._notes.is_dir():
            for note in self._notes.glob(f"{prefix}*"):
                note.unlink(missing_ok=True)
