"""/openapi.json says what the routes answer: our error shape and statuses, not FastAPI's.

tests/integration/test_openapi_conformance.py checks the same against a running gateway with
schemathesis; these say, in milliseconds, which declaration went missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contracts.settings import Settings
from gateway.http.app import create_app

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The schema a gateway serves (no broker needed to build it)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("spec"), amqp_url="amqp://guest:guest@127.0.0.1:1/"
    )
    schema: dict[str, Any] = create_app(settings).openapi()
    return schema


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) of every operation."""
    return [
        (path, method, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


def test_bad_input_is_declared_as_the_400_it_answers_not_fastapis_422(
    spec: dict[str, Any],
) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, method, operation in operations(spec):
        answers = operation["responses"]
        if operation.get("parameters") or operation.get("requestBody"):
            assert "invalid_request" in answers["400"]["description"], (path, method)
        # The 422s left, in our error shape: the upload's reused Idempotency-Key, and a
        # reindex's settings that are JSON but refused (docs/API.md, Reindex).
        if "422" in answers:
            refused = {
                ("/v1/documents", "post"): "idempotency_key_reused",
                ("/v1/collections/{collection}/reindex", "post"): "unknown_model",
            }
            assert (path, method) in refused
            assert refused[(path, method)] in answers["422"]["description"]


def test_every_error_answer_is_the_error_body_in_json(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    assert set(spec["components"]["schemas"]["ErrorDetail"]["required"]) == {"code", "message"}
    for path, method, operation in operations(spec):
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                assert answer["content"] == {"application/json": {"schema": ERROR_BODY}}, (
                    path,
                    method,
                    status,
                )


def test_each_route_declares_the_errors_it_answers(spec: dict[str, Any]) -> None:
    def statuses(path: str, method: str) -> set[str]:
        return set(spec["paths"][path][method]["responses"])

    assert {"200", "202", "400", "403", "413", "415", "422", "429", "503", "507"} <= statuses(
        "/v1/documents", "post"
    )
    assert {"202", "404", "413", "415"} <= statuses("/v1/documents/{document_id}", "put")
    assert {"204", "404"} <= statuses("/v1/documents/{document_id}", "delete")
    assert {"404"} <= statuses("/v1/jobs/{job_id}", "get")
    assert {"404", "409", "503"} <= statuses("/v1/jobs/{job_id}/retry", "post")
    assert {"400", "403"} <= statuses("/v1/search", "get")
    assert {"404"} <= statuses("/v1/collections/{collection}", "get")
    assert {"503"} <= statuses("/readyz", "get")
    # The boundary: a foreign Host everywhere but the probes, a foreign Origin on changes.
    assert "421" in statuses("/v1/jobs", "get")
    assert "421" not in statuses("/healthz", "get")
    assert "403" in statuses("/v1/documents/{document_id}", "delete")
    assert (
        "body_too_large"
        in spec["paths"]["/v1/dead-letters/replay"]["post"]["responses"]["413"]["description"]
    )


def test_streams_pages_and_metrics_declare_their_own_content_types(
    spec: dict[str, Any],
) -> None:
    paths = spec["paths"]
    events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    one_event = events["text/event-stream"]["schema"]
    assert one_event["properties"]["event"] == {"const": "status"}
    assert one_event["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/Job"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert "content" not in paths["/v1/documents/{document_id}"]["delete"]["responses"]["204"]


def test_retry_after_and_location_are_declared_where_they_are_sent(
    spec: dict[str, Any],
) -> None:
    for path, method, operation in operations(spec):
        for status in ("429", "503", "507"):
            if status in operation["responses"]:
                header = operation["responses"][status]["headers"]["Retry-After"]
                assert header["required"] is True, (path, method, status)
    upload = spec["paths"]["/v1/documents"]["post"]["responses"]
    assert upload["202"]["headers"]["Location"]["required"] is True
    assert upload["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UploadAnswer"
    }


def test_routes_behind_the_api_key_ask_for_it_and_declare_401(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path, method, operation in operations(spec):
        keyed = path.startswith("/v1/") and path != "/v1/config"
        assert ("401" in operation["responses"]) is keyed, (path, method)
        # A gateway without keys asks for none: the empty alternative.
        assert operation.get("security") == ([{"apiKey": []}, {}] if keyed else None)


def test_a_405_keeps_the_allow_header_the_framework_gave_it(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    client = TestClient(app, base_url="http://127.0.0.1")

    answer = client.request("TRACE", "/healthz")

    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"
    assert answer.json()["error"]["code"] == "method_not_allowed"
