"""`/docs` works offline: the page and every asset it loads come from the gateway."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.routes import api_docs


def test_docs_page_loads_its_assets_from_the_gateway_not_a_cdn() -> None:
    app = FastAPI(title="Sluice", docs_url=None, redoc_url=None)
    api_docs.install(app)
    client = TestClient(app, base_url="http://127.0.0.1")

    page = client.get("/docs")

    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    sources += re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)
    assert sources, page.text
    assert all(source.startswith("/") for source in sources), sources
    for source in sources:
        assert client.get(source).status_code == 200, source
    assert "swagger-ui-bundle.js" in page.text


def test_openapi_describes_what_api_md_promises(tmp_path: Path) -> None:
    """/openapi.json is generated from the code: it must show the contract's fields."""
    settings = Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    spec = create_app(settings).openapi()
    schemas = spec["components"]["schemas"]

    def fields(ref_holder: dict[str, Any]) -> set[str]:
        name = ref_holder["$ref"].rsplit("/", 1)[-1]
        return set(schemas[name]["properties"])

    upload = spec["paths"]["/v1/documents"]["post"]["requestBody"]["content"]
    assert {"file", "collection", "priority", "callback_url"} <= fields(
        upload["multipart/form-data"]["schema"]
    )
    assert {"priority", "queue", "webhook", "status", "progress", "error"} <= set(
        schemas["Job"]["properties"]
    )
    assert {"/v1/pipeline", "/v1/collections", "/v1/jobs/{job_id}/retry"} <= set(spec["paths"])
    assert "/docs" not in spec["paths"]  # served, but not part of the API
