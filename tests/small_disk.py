"""A real small filesystem for disk-full tests: a tmpfs of a few MiB mounted for one test.

Tests fill it to the last byte with a filler file, see what Sluice does, then delete the
filler, as an operator freeing space would. Mounting needs root (CI runs as root); without
it the test fails and says so, rather than being skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1 << 20


@dataclass
class SmallDisk:
    """A mounted tmpfs at `path`, and the filler file that fills it."""

    path: Path

    @property
    def filler(self) -> Path:
        """The file that takes all the space left."""
        return self.path / "filler"

    def fill(self) -> None:
        """Take every byte left: the next write of anything on this disk fails with ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            piece = MiB
            while piece:
                try:
                    os.write(fd, b"\0" * piece)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    piece //= 2
        finally:
            os.close(fd)
        assert self.free_bytes() == 0, f"{self.path} still has {self.free_bytes()} bytes free"

    def free(self) -> None:
        """Give the space back, as an operator deleting old files would."""
        self.filler.unlink()

    def free_bytes(self) -> int:
        """Bytes a writer could still use."""
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def small_disk(path: Path, size_mib: int = 4) -> Iterator[SmallDisk]:
    """A tmpfs of `size_mib` mounted at `path` (made if need be) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"disk-full tests mount a small tmpfs and need root (CI runs them as root): "
            f"mount at {path} failed: {mounted.stderr.strip() or mounted.returncode}"
        )
    try:
        yield SmallDisk(path)
    finally:
        # A process still holding a file there (a stage that did not stop) must not leave
        # the mount behind: detach it lazily then.
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)
