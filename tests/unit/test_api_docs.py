"""`/docs` works offline: the page and every asset it loads come from the gateway."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.http.routes import api_docs


def test_docs_page_loads_its_assets_from_the_gateway_not_a_cdn() -> None:
    app = FastAPI(title="Sluice", docs_url=None, redoc_url=None)
    api_docs.install(app)
    client = TestClient(app)

    page = client.get("/docs")

    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    sources += re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)
    assert sources, page.text
    assert all(source.startswith("/") for source in sources), sources
    for source in sources:
        assert client.get(source).status_code == 200, source
    assert "swagger-ui-bundle.js" in page.text
