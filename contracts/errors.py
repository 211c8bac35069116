"""One root error; its children tell the runtime what to do with the message that raised."""

from __future__ import annotations


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
