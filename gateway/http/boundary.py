"""Who may ask: the checks a request passes before the app reads a byte of its body.

Three ASGI layers, outermost first:

- `HostGate`: the Host header names this gateway (421 `host_not_allowed`). Without API keys
  a loopback gateway is otherwise open to any web page the user visits through DNS
  rebinding: the page's own name resolves to 127.0.0.1, and the browser treats the gateway
  as that page's origin, free to read and delete everything.
- `OriginGate`: without API keys, a state-changing request from a browser must come from
  the gateway's own origin (403 `cross_origin_refused`); else any page could upload through
  the user's browser (a form posted cross-site needs no CORS). With keys the page cannot
  attach the key cross-site, so the route's own 401 is the guard.
- `KeyGate`: with API keys, a state-changing /v1 request without a valid key is answered 401
  before its body is read, so an anonymous upload costs no disk (the route dependency stays:
  it says which collections the key opens).

What a request may send (its size and pace) is gateway/http/body_limits.py's.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.settings import Settings
from gateway.http.errors import error_response
from gateway.http.services import UNAUTHORIZED_MESSAGE, key_access, parse_api_keys

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What probes ask by the address they dial (a kubelet: the pod's IP); they carry nothing.
PROBES = frozenset({"/healthz", "/readyz"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names requests may carry in Host; None means any.

    `SLUICE_ALLOWED_HOSTS` always applies when set. Unset, a gateway without API keys
    answers to its loopback names and `SLUICE_HOST`, and one with keys to any: there a
    rebinding page gains nothing (it cannot send the key), and proxies, Kubernetes Services
    and probes reach a keyed gateway by names no default could list.
    """
    if settings.allowed_hosts is not None and settings.allowed_hosts.strip():
        # An entry may carry a port, as clients write it ("sluice.lan:8000"); names compare.
        names = {split_authority(n, "http")[0] for n in settings.allowed_hosts.split(",")}
        names.discard("")
        return None if "*" in names else frozenset(names)
    if parse_api_keys(settings.api_keys):
        return None
    names = set(_LOOPBACK_NAMES)
    if _bare(settings.host) not in _WILDCARDS:
        names.add(_bare(settings.host))
    return frozenset(names)


def _bare(name: str) -> str:
    """A host name as compared: lower case, no brackets around IPv6, no trailing dot."""
    return name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def split_authority(authority: str, scheme: str) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) as (bare host, port); the scheme's port if none."""
    authority = authority.strip()
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon or ":" in host or not (port_text.isdigit() or not port_text):
            host, port_text = authority, ""
    port = int(port_text) if port_text.isdigit() else _DEFAULT_PORTS.get(scheme)
    return _bare(host), port


class HostGate:
    """Answer 421 `host_not_allowed` to a request whose Host names another server."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.allowed = allowed_hosts(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the Host header, then pass the request on."""
        if scope["type"] == "http" and self.allowed is not None and scope["path"] not in PROBES:
            # A request without Host (HTTP/1.0) comes from no browser, the only party that
            # rebinding tricks; every browser sends one.
            host = Headers(scope=scope).get("host")
            if host is not None:
                name, _ = split_authority(host, scope.get("scheme", "http"))
                if name not in self.allowed:
                    response = error_response(
                        421,
                        "host_not_allowed",
                        f"This gateway does not answer to the host name {name[:100]!r}; if "
                        "it should, add it to SLUICE_ALLOWED_HOSTS.",
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class OriginGate:
    """Without API keys, answer 403 `cross_origin_refused` to a state-changing request a
    browser sends from another origin."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.enabled = not parse_api_keys(settings.api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Compare Origin (and Sec-Fetch-Site) with the request's own origin."""
        if self.enabled and scope["type"] == "http" and scope["method"] in STATE_CHANGING:
            headers = Headers(scope=scope)
            if not _same_origin(headers, scope.get("scheme", "http")):
                response = error_response(
                    403,
                    "cross_origin_refused",
                    "This gateway has no API keys, so it only takes changes from its own web "
                    "page or from clients that are not browsers; a page of another origin may "
                    "not upload, replace or delete here. Set SLUICE_API_KEYS to share it.",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _same_origin(headers: Headers, scheme: str) -> bool:
    """Whether a request comes from the gateway's own origin, or from no browser page.

    Sec-Fetch-Site, where a browser sends it, says so directly; Origin is compared by host
    and port (not scheme: a TLS proxy in front changes the scheme, never the authority).
    A page in a sandbox or a file sends Origin `null`: not ours.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    host = headers.get("host")
    if host is None or origin.strip().lower() == "null":
        return False
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return split_authority(parts.netloc, parts.scheme) == split_authority(host, scheme)


class KeyGate:
    """With API keys, answer 401 to a state-changing /v1 request without a valid key, before
    its body is read."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        # The same parsing the route dependency's keys come from (Services), from the same value.
        self.keys = parse_api_keys(settings.api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the Bearer key of a request that may carry a body."""
        if (
            self.keys
            and scope["type"] == "http"
            and scope["method"] in STATE_CHANGING
            and (scope["path"] == "/v1" or scope["path"].startswith("/v1/"))
            and key_access(self.keys, Headers(scope=scope).get("authorization", "")) is None
        ):
            response = error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
