"""A random secret made once and kept in a file, so every process on one disk signs alike."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from contracts.errors import SluiceError


def kept_secret(path: Path, *, setting: str) -> str:
    """The secret in `path`; made (32 random bytes, as hex, mode 0600) if there is none yet.

    Creation is atomic and never replaces a file: the secret is written whole to a private
    temporary file, which is then hard-linked into place. Of processes starting at once
    exactly one link succeeds, and every one of them reads that file, so they all agree.
    `setting` names the variable that makes the file unnecessary, for error messages.
    """
    try:
        return _read(path, setting)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file readable and writable by its owner only (0600).
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            # Another process that made it first wins: its secret is the one.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    except OSError as exc:
        raise SluiceError(
            f"cannot keep a secret in {path} ({exc}): make the directory writable, or set "
            f"{setting}",
            code="usage_error",
        ) from exc
    return _read(path, setting)


def _read(path: Path, setting: str) -> str:
    secret = path.read_text().strip()
    if not secret:
        raise SluiceError(
            f"{path} is empty: delete it to have a new secret made, or set {setting}",
            code="usage_error",
        )
    return secret
