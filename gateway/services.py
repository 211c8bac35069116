"""The gateway's long-lived resources, built once at start-up and handed to routes."""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from contracts.settings import Settings
from gateway.errors import ApiError
from gateway.jobs import JobStore
from stages.backends.blobs import LocalBlobStore
from stages.backends.embedder import Embedder
from stages.backends.vectors import VectorIndex
from stages.broker import Broker


class JobChanges:
    """Wakes the live-event streams of a job when the tracker changed it."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        """A job changed."""
        for event in self._waiters.get(job_id, ()):
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
    blobs: LocalBlobStore
    index: VectorIndex
    broker: Broker
    changes: JobChanges = field(default_factory=JobChanges)
    _embedder: Embedder | None = None
    _embedder_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def embedder(self) -> Embedder:
        """The query embedder, loaded on first search so the gateway starts fast."""
        async with self._embedder_lock:
            if self._embedder is None:
                from stages.backends.embedder import SentenceTransformerEmbedder

                self._embedder = await asyncio.to_thread(
                    SentenceTransformerEmbedder,
                    self.settings.model_dir,
                    self.settings.embed_device,
                    self.settings.embed_batch_size,
                )
            return self._embedder


def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


def require_api_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    """When API keys are configured, every /v1 request must carry one of them."""
    keys = services.settings.api_keys
    if not keys:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not any(secrets.compare_digest(given, k.strip()) for k in keys.split(",") if k.strip()):
        raise ApiError(
            401, "unauthorized", "Send a valid API key as 'Authorization: Bearer <key>'."
        )


ServicesDep = Annotated[Services, Depends(get_services)]
