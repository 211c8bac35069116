"""What the API answers besides success, as /openapi.json tells it: named here once.

Routes declare their own answers with `errors(...)` (and `json_answer(...)` for a success a
route builds itself; routers behind the API key, `responses=KEYED`); `install` then makes the
generated schema true for every route at once: FastAPI's 422 validation answer becomes the
400 `invalid_request` that errors.py really sends, and each route gains the answers of the
boundary that runs before it (hosts, origins, body limits). A test
(tests/integration/test_openapi_conformance.py) runs schemathesis against a real gateway, so
this page and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.http.boundary import PROBES, STATE_CHANGING
from gateway.http.schemas import UploadAnswer


class ErrorDetail(BaseModel):
    """What went wrong: a stable snake_case code, and a sentence for a person."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


# A route's `responses=`: each status it may answer besides its success, with its body.
Responses = dict[int | str, dict[str, Any]]

# These tell a client when to come back (see errors.py).
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_WITH_RETRY_AFTER = (429, 503, 507)
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _describe(codes: Iterable[str]) -> str:
    return "Error codes: " + ", ".join(f"`{code}`" for code in codes) + "."


def errors(by_status: Mapping[int, str | Iterable[str]]) -> Responses:
    """`responses=` for a route: each error status it answers, with the codes it uses."""
    declared: Responses = {}
    for status, codes in by_status.items():
        names = [codes] if isinstance(codes, str) else list(codes)
        # The body is JSON whatever the route's success is (an event stream, metrics text).
        answer: dict[str, Any] = {"description": _describe(names), "content": _ERROR_CONTENT}
        if status in _WITH_RETRY_AFTER:
            answer["headers"] = _RETRY_AFTER
        declared[status] = answer
    return declared


def json_answer(status: int, model: type[BaseModel], description: str) -> Responses:
    """`responses=` for a success a route answers with a JSONResponse of its own."""
    return {status: {"model": model, "description": description}}


class EventStream(StreamingResponse):
    """A `text/event-stream` answer: the `response_class` that documents a route's SSE.

    Not FastAPI's own `EventSourceResponse`, which also changes how the route is called (it
    must then yield events rather than return a response).
    """

    media_type = "text/event-stream"


def event_stream(event: str, data: type[BaseModel], description: str) -> Responses:
    """`responses=` for a 200 event stream whose events are all `event`, with `data` as JSON
    (an Open API 3.1 `schema` of an event stream describes one event)."""
    one_event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": event},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                # Named, not inlined: the route's own schema lists `data` under components.
                "contentSchema": {"$ref": f"#/components/schemas/{data.__name__}"},
            },
        },
    }
    return {
        200: {
            "description": description,
            "content": {EventStream.media_type: {"schema": one_event}},
        }
    }


# An upload's two successes (POST /v1/documents, PUT /v1/documents/{id}).
UPLOAD_ANSWERS: Responses = {
    202: {
        "model": UploadAnswer,
        "description": "Accepted: the broker confirmed the job's first message (a held job: "
        "it is recorded and waits for its turn).",
        "headers": {
            "Location": {
                "description": "The new job's status URL (`/v1/jobs/{job_id}`).",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    },
    200: {
        "model": UploadAnswer,
        "description": "A duplicate (the same bytes, or the same Idempotency-Key, seen "
        'before): the existing job, with `"duplicate": true`; no new work.',
    },
}

# What a router behind the API-key dependency answers a caller without a valid key, on a
# gateway with SLUICE_API_KEYS: `APIRouter(..., responses=KEYED)`. The schema asks for the
# bearer key wherever this is declared.
KEYED: Responses = errors({401: "unauthorized"})

# What the boundary (gateway/http/boundary.py, body_limits.py) answers before a route runs:
# a Host that names another server (every path but the probes), a browser's state-changing
# request from another origin (a gateway without keys), a body too large or too slow.
_FOREIGN_HOST = {421: ["host_not_allowed"]}
_FOREIGN_ORIGIN = {403: ["cross_origin_refused"]}
_UPLOAD_TOO_LARGE = {413: ["file_too_large"], 408: ["body_timeout"]}
_BODY_TOO_LARGE = {413: ["body_too_large"], 408: ["body_timeout"]}
_BEARER = "apiKey"


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) describe the answers the routes really give."""
    generate = app.openapi
    done: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        # FastAPI caches the schema it generated; it is corrected once, in place.
        if not done or done[0] is not schema:
            _correct(schema)
            done[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _correct(schema: dict[str, Any]) -> None:
    """Replace FastAPI's 422 with our 400, add the boundary's answers, and ask for the
    bearer key where a route answers 401."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, error_schemas = models_json_schema(
        [(ErrorBody, "serialization")], ref_template="#/components/schemas/{model}"
    )
    for name, definition in error_schemas.get("$defs", {}).items():
        schemas.setdefault(name, definition)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    keyed = False
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {})
            if validation.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            # errors.py answers a malformed parameter or body 400, not FastAPI's 422.
            if operation.get("parameters") or operation.get("requestBody"):
                _add(responses, 400, ["invalid_request"])
            for status, codes in _boundary(path, method, operation).items():
                _add(responses, status, codes)
            if "401" in responses:
                # The empty alternative: a gateway without keys asks for none.
                operation["security"] = [{_BEARER: []}, {}]
                keyed = True
            operation["responses"] = dict(sorted(responses.items()))
    if keyed:
        components.setdefault("securitySchemes", {})[_BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A key of SLUICE_API_KEYS; a gateway without keys needs none.",
        }


def _boundary(path: str, method: str, operation: dict[str, Any]) -> dict[int, list[str]]:
    """The boundary's answers to one operation, by status."""
    answers: dict[int, list[str]] = {}
    if path not in PROBES:
        answers |= _FOREIGN_HOST
    if method.upper() in STATE_CHANGING:
        answers |= _FOREIGN_ORIGIN
    body = operation.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in body:
        answers |= _UPLOAD_TOO_LARGE
    elif body:
        answers |= _BODY_TOO_LARGE
    return answers


def _add(responses: dict[str, Any], status: int, codes: list[str]) -> None:
    """Declare an error answer, or add codes to the one the route declared already."""
    existing = responses.get(str(status))
    if existing is None:
        content = copy.deepcopy(_ERROR_CONTENT)
        responses[str(status)] = {"description": _describe(codes), "content": content}
        return
    description = existing.get("description", "")
    missing = [code for code in codes if f"`{code}`" not in description]
    if missing and description.startswith("Error codes: "):
        added = ", ".join(f"`{code}`" for code in missing)
        existing["description"] = f"{description.removesuffix('.')}, {added}."
