"""How a webhook is signed, defined once for the sender (the webhook stage) and receivers.

`X-Sluice-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body bytes under the
webhook secret (`SLUICE_WEBHOOK_SECRET`, else the one kept in `<data_dir>/webhook.secret`).
A receiver recomputes it over the raw body it read, before parsing it, and compares in
constant time; `X-Sluice-Delivery` is the same on every try of one delivery, so it dedupes.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Sluice-Signature"
DELIVERY_HEADER = "X-Sluice-Delivery"
JOB_HEADER = "X-Sluice-Job-Id"
_PREFIX = "sha256="


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Sluice-Signature` value of a body: `sha256=` and the hex HMAC-SHA256."""
    return _PREFIX + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, signature: str | None) -> bool:
    """Whether a received `X-Sluice-Signature` header is the signature of `body`."""
    if not signature:
        return False
    # As bytes: compare_digest refuses non-ASCII text, which a forged header may carry.
    return hmac.compare_digest(sign(secret, body).encode(), signature.strip().encode())
