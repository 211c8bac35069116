"""An upload's Idempotency-Key: checked at the door, and scoped to whoever sent it.

A key is its owner's, in one collection: two API keys (tenants) that happen to choose the
same Idempotency-Key never meet, neither in an answer nor by one's upload being dropped as
the other's duplicate. The owner is a fingerprint of the caller's API key, so the job store
never holds a key; a gateway without API keys has one caller, so one owner.
"""

from __future__ import annotations

import hashlib

from gateway.http.errors import ApiError
from gateway.http.services import Services
from gateway.store.base import OPEN_KEY_OWNER, IdempotencyKeyReused

# Room for any UUID, ULID or hash a client makes keys of, well inside an index entry.
MAX_KEY_CHARS = 255
# The fingerprint is of this and the key, so it matches no other digest of the same key.
_OWNER_CONTEXT = b"sluice idempotency-key owner\x00"


def key_owner(api_key: str | None) -> str:
    """Whose Idempotency-Keys an upload's is among: a fingerprint of the caller's API key
    (the same on every gateway; never the key itself), or the one owner of a gateway
    without keys."""
    if api_key is None:
        return OPEN_KEY_OWNER
    return hashlib.sha256(_OWNER_CONTEXT + api_key.encode()).hexdigest()


def valid_idempotency_key(raw: str | None) -> str | None:
    """The header's key (None when absent or blank), or a 400 for one too long to be a key."""
    key = (raw or "").strip()
    if len(key) > MAX_KEY_CHARS:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"The Idempotency-Key is {len(key)} characters long; send at most "
            f"{MAX_KEY_CHARS} (a UUID is 36).",
        )
    return key or None


def key_reused(exc: IdempotencyKeyReused) -> ApiError:
    """The 422 for a key that came back with other bytes than its first upload's."""
    return ApiError(422, exc.code, exc.message)


def discard_refused_blob(services: Services, sha256: str) -> None:
    """Remove the blob an upload stored before it was refused, unless a live document's job
    uses those bytes too (blobs are shared by content)."""
    if not services.store.blob_in_use(sha256):
        services.blobs.delete(sha256)
