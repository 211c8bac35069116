"""Spooling an upload to a local temporary file, hashing it as it arrives."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.errors import StorageFull, is_disk_full


async def stream_to_staging(
    chunks: AsyncIterator[bytes], staging: Path, limit_bytes: int
) -> tuple[Path, str, int]:
    """Write a stream to a staging file, hashing as it goes; stops past `limit_bytes`.

    Returns the file, its sha256 and its size; a size above the limit means the caller
    must reject the upload (the file is already removed then). A full disk raises
    `StorageFull`; nothing is left behind then, nor when the stream breaks off.
    """
    digest = hashlib.sha256()
    size = 0
    with _full_disk_is_transient(staging):
        fd, name = tempfile.mkstemp(dir=staging)
    path = Path(name)
    with _removed_if_cut_short(path), _full_disk_is_transient(staging), os.fdopen(fd, "wb") as out:
        async for piece in chunks:
            size += len(piece)
            if size > limit_bytes:
                break
            digest.update(piece)
            out.write(piece)
    if size > limit_bytes:
        path.unlink(missing_ok=True)
    return path, digest.hexdigest(), size


@contextmanager
def _removed_if_cut_short(path: Path) -> Iterator[None]:
    """Remove a staging file whose writing failed, whatever stopped it."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextmanager
def _full_disk_is_transient(staging: Path) -> Iterator[None]:
    """ENOSPC and EDQUOT as `StorageFull`: the gateway answers 507, to be tried again later."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise StorageFull(
            f"the upload staging directory {staging} has no space left ({exc.strerror}); "
            "free space on its disk (SLUICE_DATA_DIR)"
        ) from exc
