"""One root error; its children tell the runtime what to do with the message that raised."""

from __future__ import annotations

import errno


class SluiceError(Exception):
    """Root of every error Sluice raises on purpose; `code` is stable and machine-readable."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The sentence a person reads: what failed and what to do."""
        return str(self)


class Permanent(SluiceError):
    """Bad input: retrying cannot help. The runtime dead-letters the message and fails the job."""

    code = "invalid_input"


class Transient(SluiceError):
    """A dependency is briefly unavailable: the runtime retries the message later, with backoff."""

    code = "temporarily_unavailable"


class StorageFull(Transient):
    """A disk (or quota) Sluice writes to is full: no fault of the message, so it waits for
    space as long as that takes, and the runtime retries it without spending an attempt."""

    code = "storage_full"


# How "no space" reads in an error of a Rust library (LanceDB): std::io::Error's own format.
_RUST_DISK_FULL = tuple(f"(os error {n})" for n in (errno.ENOSPC, errno.EDQUOT))


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk or the user's quota is full (ENOSPC, EDQUOT), whether
    Python raised it or a native library wrapped the OS error in its own exception."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(marker in str(exc) for marker in _RUST_DISK_FULL)
