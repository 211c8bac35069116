"""The gateway's long-lived resources, built once at start-up and handed to routes."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from contracts.errors import SluiceError
from contracts.messages import COLLECTION_PATTERN
from contracts.settings import Settings
from gateway.http.errors import ApiError
from gateway.store.base import JobStore
from stages.backends.protocols import BlobStore, Embedder, VectorIndex
from stages.infra.broker import Broker


@dataclass(frozen=True)
class Access:
    """The collections a caller may read and write: all of them (`collections is None`) or a set."""

    collections: frozenset[str] | None = None

    @property
    def unrestricted(self) -> bool:
        """Whether every collection is open to the caller."""
        return self.collections is None

    def allows(self, collection: str) -> bool:
        """Whether the caller may read and write this collection."""
        return self.collections is None or collection in self.collections

    def require(self, collection: str) -> None:
        """Raise 403 unless the caller may use this collection."""
        if not self.allows(collection):
            allowed = ", ".join(sorted(self.collections or ()))
            raise ApiError(
                403,
                "collection_forbidden",
                f"This API key may not use collection {collection!r}; it may use: {allowed}.",
            )


OPEN_ACCESS = Access()


@dataclass(frozen=True)
class ApiKey:
    """One configured key and what it opens."""

    secret: bytes
    access: Access


def parse_api_keys(raw: str | None) -> tuple[ApiKey, ...]:
    """`SLUICE_API_KEYS` as keys: `key` (every collection) or `key:coll1|coll2`, comma-separated.

    Empty or unset means no keys (an open gateway); anything malformed is a usage error.
    """
    keys: list[ApiKey] = []
    for n, entry in enumerate((raw or "").split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        secret, scoped, names = entry.partition(":")
        secret = secret.strip()
        if not secret or any(c.isspace() for c in secret):
            raise _bad_keys(f"entry {n} has an empty key or one with spaces in it")
        if any(secrets.compare_digest(secret.encode(), k.secret) for k in keys):
            raise _bad_keys(f"entry {n} repeats a key given earlier")
        collections = None
        if scoped:
            collections = frozenset(c.strip() for c in names.split("|"))
            invalid = sorted(c for c in collections if not re.fullmatch(COLLECTION_PATTERN, c))
            if invalid:
                raise _bad_keys(f"entry {n} names invalid collection(s) {invalid}")
        keys.append(ApiKey(secret.encode(), Access(collections)))
    if raw and raw.strip() and not keys:
        raise _bad_keys("no key in it")
    return tuple(keys)


def _bad_keys(problem: str) -> SluiceError:
    # The keys themselves are secrets: the message names entries by position, never by value.
    return SluiceError(
        f"SLUICE_API_KEYS is malformed: {problem}. Write `key` (every collection) or "
        "`key:coll1|coll2`, comma-separated.",
        code="usage_error",
    )


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_exposure(settings: Settings) -> None:
    """Raise a usage error when the gateway would listen beyond loopback without API keys."""
    if parse_api_keys(settings.api_keys) or settings.allow_open or is_loopback(settings.host):
        return
    raise SluiceError(
        f"refusing to listen on {settings.host!r} without API keys: anyone who reaches it "
        "could read and delete every document. Set SLUICE_API_KEYS, listen on 127.0.0.1 "
        "(SLUICE_HOST), or set SLUICE_ALLOW_OPEN=true if the network is trusted.",
        code="usage_error",
    )


class JobChanges:
    """Wakes the live-event streams of a job when it changed: the gateway's own tracker and
    routes call it directly, the change feed (gateway/store/changes.py) for changes that
    other gateways made."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        """A job changed."""
        for event in self._waiters.get(job_id, ()):
            event.set()

    def notify_all(self) -> None:
        """Changes may have been missed (the change feed reconnected): every stream looks again."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when the job changes, or after `timeout_s` (another gateway may change it)."""
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._waiters[job_id].discard(event)
            if not self._waiters[job_id]:
                del self._waiters[job_id]


@dataclass
class Services:
    """Everything a route may need."""

    settings: Settings
    store: JobStore
    blobs: BlobStore
    index: VectorIndex
    broker: Broker
    changes: JobChanges = field(default_factory=JobChanges)
    # Rung when a held job may have its turn (one was recorded, or a job ended), so the
    # admitter (gateway/http/admission.py) looks at once instead of at its next round.
    admissions: asyncio.Event = field(default_factory=asyncio.Event)
    # Rung when a reindex may move on (one started, or a job ended), so the reindex monitor
    # (gateway/http/reindex_monitor.py) looks at once.
    reindexes: asyncio.Event = field(default_factory=asyncio.Event)
    api_keys: tuple[ApiKey, ...] = field(init=False)
    _embedders: dict[str | None, Embedder] = field(default_factory=dict)
    _embedder_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        # Parsed once, at start-up, so a malformed value stops the gateway before it serves.
        self.api_keys = parse_api_keys(self.settings.api_keys)

    def job_ended(self) -> None:
        """A job may have ended: held jobs may have room, and a reindex may move on."""
        self.admissions.set()
        self.reindexes.set()

    async def embedder(self, model: str | None = None) -> Embedder:
        """The query embedder of a generation's model (None: the deployment's), loaded on
        first search so the gateway starts fast, then kept."""
        async with self._embedder_lock:
            found = self._embedders.get(model)
            if found is None:
                from stages.backends.factory import embedder_for

                found = await asyncio.to_thread(embedder_for, self.settings, model)
                self._embedders[model] = found
            return found


def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


def require_api_key(
    request: Request, services: Annotated[Services, Depends(get_services)]
) -> Access:
    """The caller's access: everything without configured keys, else what its Bearer key opens."""
    if not services.api_keys:
        return OPEN_ACCESS
    found = key_access(services.api_keys, request.headers.get("authorization", ""))
    if found is None:
        raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE)
    return found


UNAUTHORIZED_MESSAGE = "Send a valid API key as 'Authorization: Bearer <key>'."


def key_access(api_keys: tuple[ApiKey, ...], authorization: str) -> Access | None:
    """What an `Authorization` header's Bearer key opens; None for no key or a wrong one.

    Shared by the route dependency and the boundary (gateway/http/boundary.py), which refuses
    a keyless upload before a byte of its body is read."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    found: Access | None = None
    # Every key is compared, so the time taken says nothing about which one nearly matched.
    for key in api_keys:
        if secrets.compare_digest(given, key.secret) and found is None:
            found = key.access
    return found if given else None


ServicesDep = Annotated[Services, Depends(get_services)]
AccessDep = Annotated[Access, Depends(require_api_key)]
