"""The in-request baseline: a FastAPI upload route that parses, chunks, embeds and indexes
before it answers, with Sluice's own four stage handlers called in process.

Run as `python -m bench.inrequest_app --port N --data-dir DIR` (bench/inrequest.py does).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, File, Form, UploadFile

from bench.inproc import InProcess, bench_settings


def create_app(data_dir: Path) -> FastAPI:
    """The app: every stage's context built at start-up, the whole pipeline inside the route."""
    held: dict[str, InProcess] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        held["pipeline"] = await InProcess.start(bench_settings(data_dir))
        try:
            yield
        finally:
            await held["pipeline"].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Up once every stage's context is built."""
        return {"status": "ok"}

    @app.post("/v1/documents")
    async def upload(
        file: Annotated[UploadFile, File()], collection: Annotated[str, Form()] = "default"
    ) -> dict[str, Any]:
        """Ingest one document completely, then answer with its chunk count and stage times."""
        pipeline = held["pipeline"]
        data = await file.read()
        passage = await pipeline.run(pipeline.uploaded(file.filename or "upload", data, collection))
        return {"chunks": passage.chunks, "seconds": passage.seconds}

    return app


def main() -> None:
    """Serve the app on loopback until SIGTERM."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    args = ap.parse_args()
    uvicorn.run(create_app(args.data_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
