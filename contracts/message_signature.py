"""How Sluice processes sign the messages they send each other over the broker, defined once
for the publisher (`Broker.publish`) and every consumer (stages, the tracker, the monitor).

Anyone who can publish to the exchange could otherwise feed the stages work: another
tenant's blob into one's own collection, a batch that tells the index a document is whole.
So every message carries `x-sluice-signature: v1=<hex>`, the HMAC-SHA256 under the
deployment's secret (`SLUICE_MESSAGE_SECRET`, else the one kept in `<data_dir>/message.secret`)
of the message's topic and its exact body bytes. The topic is the routing key it was first
published with, without its lane (`doc.parsed`, `job.parse.progress`, `worker.embed`): a
consumer knows which topic it reads, so a signed message is good only where it was sent, and
the signature survives what moves a message on (retry tiers, dead-lettering, replay) without
changing it. A consumer checks it before it parses the body, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

SIGNATURE_HEADER = "x-sluice-signature"
UNAUTHENTICATED = "unauthenticated_message"
_PREFIX = "v1="
# Keeps these MACs apart from any other use of the same secret.
_DOMAIN = b"sluice-message-v1\x00"


class MessageSigner:
    """Signs and verifies messages under one secret; the keyed state is made once, so each
    message costs one HMAC and nothing else."""

    def __init__(self, secret: str | bytes) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if not key:
            raise ValueError("a message secret must not be empty")
        self._keyed = hmac.new(key, _DOMAIN, hashlib.sha256)

    def _mac(self, topic: str, body: bytes) -> hmac.HMAC:
        mac = self._keyed.copy()
        mac.update(topic.encode())
        mac.update(b"\x00")
        mac.update(body)
        return mac

    def sign(self, topic: str, body: bytes) -> str:
        """The `x-sluice-signature` value of a body sent on `topic`: `v1=` and the hex MAC."""
        return _PREFIX + self._mac(topic, body).hexdigest()

    def verify(self, topic: str, body: bytes, signature: object) -> bool:
        """Whether `signature` (a header value as a client hands it over: text, bytes or
        missing) is the signature of `body` sent on `topic`."""
        if isinstance(signature, bytes | bytearray):
            given = bytes(signature)
        elif isinstance(signature, str):
            # As bytes: compare_digest refuses non-ASCII text, which a forged header may carry.
            given = signature.encode("utf-8", "replace")
        else:
            return False
        if not given.startswith(_PREFIX.encode()):
            return False
        expected = self._mac(topic, body).hexdigest().encode()
        return hmac.compare_digest(expected, given[len(_PREFIX) :])

    def verify_headers(self, topic: str, body: bytes, headers: Mapping[str, Any] | None) -> bool:
        """Whether a message's headers carry the signature of `body` sent on `topic`."""
        return self.verify(topic, body, (headers or {}).get(SIGNATURE_HEADER))
