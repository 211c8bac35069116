"""The gateway: a FastAPI app that owns the job store and answers uploads in milliseconds."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from contracts.settings import Settings
from gateway.http import api_responses, errors
from gateway.http.admission import Admitter
from gateway.http.body_limits import BodyLimits
from gateway.http.boundary import HostGate, KeyGate, OriginGate
from gateway.http.pipeline_monitor import PipelineMonitor
from gateway.http.reindex_monitor import ReindexMonitor
from gateway.http.republisher import Republisher
from gateway.http.routes import (
    api_docs,
    collections,
    dead_letters,
    documents,
    jobs,
    ops,
    page,
    pipeline,
    reindex,
    search,
)
from gateway.http.services import Services, refuse_open_exposure
from gateway.http.webhook_dispatch import WebhookDispatcher
from gateway.store.base import open_job_store
from gateway.store.changes import open_change_feed
from gateway.store.tracker import Tracker
from stages.backends.factory import open_blob_store, open_index
from stages.infra import tracing
from stages.infra.broker import Broker
from stages.infra.logs import configure_logging

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; resources are built when it starts and closed when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = Broker(settings)
        services = Services(
            settings=settings,
            store=open_job_store(settings),
            blobs=open_blob_store(settings),
            index=open_index(settings),
            broker=broker,
        )
        app.state.services = services
        tracker = Tracker(broker, services.store, services.changes, on_job_end=services.job_ended)
        # Worker heartbeats and queue samples for GET /v1/pipeline.
        monitor = PipelineMonitor(broker, settings)
        app.state.pipeline_monitor = monitor
        # Changes folded by other gateways' trackers (a shared PostgreSQL store) wake this
        # gateway's event streams too; with SQLite there are none.
        feed = open_change_feed(settings, services.changes)
        await feed.start()

        republisher = Republisher(services)
        # Held jobs (bulk, or past their collection's cap) let in fairly as room comes free.
        admitter = Admitter(services)
        # Finished jobs' webhooks, handed to the webhook stage.
        webhooks = WebhookDispatcher(services)
        # Reindexes moved on: their documents sent through, the switch, old generations dropped.
        reindexes = ReindexMonitor(services)

        async def connect_and_track() -> None:
            await broker.connect(wait_s=math.inf)
            await tracker.start()
            await monitor.start()
            log.info("gateway connected to RabbitMQ and tracking jobs")
            # What a dead gateway recorded but never got confirmed, this one sends again;
            # beside it, the webhooks of jobs that ended, and held jobs let in as room frees.
            await asyncio.gather(republisher.run(), webhooks.run(), admitter.run(), reindexes.run())

        # The gateway serves (and answers 503 to uploads) while the broker is away, so it
        # starts without one; /readyz says when it is ready.
        connecting = asyncio.create_task(connect_and_track())
        log.info("gateway listening on http://%s:%d", settings.host, settings.port)
        try:
            yield
        finally:
            connecting.cancel()
            await tracker.stop()
            await monitor.stop()
            await feed.stop()
            await broker.close()

    # /docs is served with its assets from here (routes/api_docs.py), not from a CDN; ReDoc,
    # which only a CDN serves, is off.
    app = FastAPI(title="Sluice", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    api_docs.install(app)
    api_responses.install(app)
    if tracing.enabled():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # The upload request's SERVER span is the root of the document's whole trace.
        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")
    errors.install(app)
    # The boundary, outermost first: the host, the origin, the key, then the body's size and
    # pace (gateway/http/boundary.py, body_limits.py); a request refused by one of the first
    # three is answered before a byte of its body is read.
    app.add_middleware(
        BodyLimits,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(KeyGate, settings=settings)
    app.add_middleware(OriginGate, settings=settings)
    app.add_middleware(HostGate, settings=settings)
    for module in (
        documents,
        jobs,
        collections,
        reindex,
        dead_letters,
        search,
        ops,
        page,
        pipeline,
    ):
        app.include_router(module.router)
    return app


def serve(settings: Settings) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM.

    Raises a usage error (exit 2 from the CLI) for malformed API keys, or for a listen address
    beyond loopback without keys unless `SLUICE_ALLOW_OPEN` says the network is trusted.
    """
    import uvicorn

    from gateway.http.connections import fit_open_files, server_options

    refuse_open_exposure(settings)
    configure_logging("sluice-gateway", settings.log_format, settings.log_level)
    tracing.setup_tracing("sluice-gateway")
    fit_open_files(settings.max_connections)
    # Head and drain deadlines and the connection limit live in the connection protocol
    # (gateway/http/connections.py): uvicorn has none of them.
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, **server_options(settings)
    )
