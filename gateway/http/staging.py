"""Spooling an upload to a local temporary file, hashing it as it arrives."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path


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
