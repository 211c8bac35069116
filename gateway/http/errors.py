"""The API's error shape: `{"error": {"code", "message"}}`, with Retry-After on 429/503/507."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from contracts.errors import Permanent, StorageFull, Transient

log = logging.getLogger(__name__)

# A full disk is freed by a person, not in a moment: clients are asked to wait longer.
STORAGE_FULL_RETRY_AFTER_S = 30


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, a sentence for a person."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def error_response(
    status: int, code: str, message: str, retry_after_s: int | None = None
) -> JSONResponse:
    """The JSON error body every 4xx/5xx carries."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


_CODE_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def install(app: FastAPI) -> None:
    """Make every error, ours or the framework's, answer in the API's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StorageFull)
    async def _storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        # Where and why is for the operator, in the log; the client learns what to do.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(
            507,
            exc.code,
            "The gateway's storage is full, so nothing was stored; try again later.",
            retry_after_s=STORAGE_FULL_RETRY_AFTER_S,
        )

    @app.exception_handler(Transient)
    async def _transient(request: Request, exc: Transient) -> JSONResponse:
        # A dependency (broker, embedding endpoint, store) is briefly away: say so, and when.
        return error_response(503, exc.code, str(exc), retry_after_s=5)

    @app.exception_handler(Permanent)
    async def _permanent(request: Request, exc: Permanent) -> JSONResponse:
        return error_response(400, exc.code, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _CODE_OF_STATUS.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail))
        # The framework's headers stay: a 405's `Allow` names the methods there are.
        response.headers.update(exc.headers or {})
        return response

    # Starlette answers an unhandled exception with this, then raises it on, and the server
    # logs it with its traceback (uvicorn: "Exception in ASGI application"): logging it here
    # too would print every traceback twice. The client learns nothing of the internals.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            500,
            "internal_error",
            "The gateway failed to answer this request; the error is in its log. "
            "Try again, and tell its operator if it persists.",
        )
