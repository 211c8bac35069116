"""The web page: `/`, its static files, and the little configuration it reads at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from gateway.http.errors import ApiError
from gateway.http.services import ServicesDep, require_api_key

router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Everything the page needs comes from this origin; links to Jaeger and RabbitMQ are just links.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files; revalidating keeps a deployed change visible at the next reload.
    "Cache-Control": "no-cache",
}


def _static(name: str) -> FileResponse:
    """One file of the static directory, by bare name only (no paths, no dotfiles)."""
    path = STATIC_DIR / name
    media_type = _MEDIA_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or media_type is None or not path.is_file():
        raise ApiError(404, "not_found", f"No static file {name[:80]!r}.")
    return FileResponse(path, media_type=media_type, headers=_PAGE_HEADERS)


@router.get(
    "/", response_class=HTMLResponse, responses={200: {"description": "The web page (HTML)."}}
)
async def index() -> FileResponse:
    """The page: uploads, live progress, jobs, search."""
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    """The page's script and style sheet."""
    return _static(name)


@router.get("/v1/config")
async def config(services: ServicesDep, request: Request) -> dict[str, Any]:
    """What the page needs to know: whether a key is required, the operator UIs' links, and
    the pipeline's stages and statuses in order (so the page hard-codes none of them).

    Open to every caller, so the page can tell whether to ask for a key; the links (internal
    addresses) are only given to a caller whose key is valid, and the keys never.
    """
    try:
        require_api_key(request, services)
        authorized = True
    except ApiError:
        authorized = False
    settings = services.settings
    pipeline = settings.pipeline
    return {
        "auth_required": bool(services.api_keys),
        "authorized": authorized,
        "jaeger_ui_url": settings.jaeger_ui_url if authorized else None,
        "rabbitmq_ui_url": settings.rabbitmq_ui_url if authorized else None,
        "stages": [{"name": s.name, "status": s.status} for s in pipeline.stages],
        "statuses": list(pipeline.statuses),
    }
