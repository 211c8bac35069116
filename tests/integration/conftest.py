"""Fixtures for integration tests: one real pipeline shared by the tests that need it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from pipeline import Pipeline, start_pipeline, stop_pipeline


@pytest.fixture(scope="session")
def pipeline(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One real Sluice for the integration tests that share it."""
    running = start_pipeline(broker, tmp_path_factory.mktemp("pipeline"))
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the pipeline's gateway."""
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as client:
        yield client
