"""Where a webhook may go: the rules the gateway applies to an upload's `callback_url` and the
webhook stage applies again at send time (a name's addresses can change in between).

Pure: the callers resolve the host themselves (off their event loop) and hand the addresses
in. A target is refused when it is not plain http(s) to a host, carries credentials, is too
long, or when any address its host resolves to is not a public one (loopback, private,
link-local, multicast, reserved, unspecified): a webhook must not become a way to reach the
machines beside Sluice. `SLUICE_WEBHOOK_ALLOW_PRIVATE` lifts the address rule only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from contracts.errors import Permanent

MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ALLOW_PRIVATE_HINT = (
    "or set SLUICE_WEBHOOK_ALLOW_PRIVATE=true if receivers on private networks are trusted"
)


class CallbackRefused(Permanent):
    """A callback URL Sluice will not call; the message says what to change."""

    code = "invalid_callback_url"


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL that passed the syntax rules, taken apart."""

    url: str
    scheme: str
    # Lowercase, ASCII (IDNA), without the brackets of an IPv6 literal.
    host: str
    port: int

    @property
    def host_header(self) -> str:
        """The `Host` header a request to this URL carries."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def pinned(self, address: str) -> str:
        """The URL with its host replaced by one checked address, so the request goes to the
        address that was checked, not to whatever the name resolves to a moment later."""
        parts = urlsplit(self.url)
        literal = f"[{address}]" if ":" in address else address
        if self.port != _DEFAULT_PORTS[self.scheme]:
            literal = f"{literal}:{self.port}"
        return urlunsplit(parts._replace(netloc=literal))


def _shown(url: str) -> str:
    return repr(url if len(url) <= 100 else url[:97] + "...")


def parse_callback_url(url: str) -> CallbackTarget:
    """The target of a callback URL; raises `CallbackRefused` when its form is not allowed."""
    shown = _shown(url)
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(
            f"callback_url is {len(url)} characters long; use one of at most {MAX_URL_LENGTH}."
        )
    if not url or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise CallbackRefused(
            f"callback_url {shown} is empty or has spaces or control characters in it; "
            "percent-encode them."
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(
            f"callback_url {shown} is not a valid URL ({exc}); write it as "
            "https://host[:port]/path."
        ) from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise CallbackRefused(
            f"callback_url {shown} uses {parts.scheme or 'no'} scheme; use an http:// or "
            "https:// URL."
        )
    if "@" in parts.netloc:
        raise CallbackRefused(
            f"callback_url {shown} carries credentials (user:password@); remove them and "
            "verify the X-Sluice-Signature header in the receiver instead."
        )
    host = parts.hostname or ""
    if not host:
        raise CallbackRefused(f"callback_url {shown} names no host; write https://host/path.")
    try:
        # A name is sent (Host header, TLS server name) in its ASCII form.
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise CallbackRefused(
            f"callback_url {shown} has a host name that is not valid ({exc})."
        ) from exc
    return CallbackTarget(url, scheme, ascii_host, port or _DEFAULT_PORTS[scheme])


def address_problem(address: str) -> str | None:
    """Why an address may not receive webhooks ("a loopback address"), or None if public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    # ::ffff:127.0.0.1 is 127.0.0.1: judge the IPv4 address it carries.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    kinds = (
        ("a loopback", ip.is_loopback),
        ("an unspecified", ip.is_unspecified),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a reserved", ip.is_reserved),
        ("a private", ip.is_private),
        # Shared (carrier-grade NAT), benchmarking, documentation ranges...: not the internet.
        ("a non-public", not ip.is_global),
    )
    return next((f"{kind} address" for kind, hit in kinds if hit), None)


def check_addresses(
    target: CallbackTarget, addresses: Sequence[str], *, allow_private: bool
) -> None:
    """Raise `CallbackRefused` unless every address the target's host resolved to may receive
    webhooks (any address at all, with `allow_private`)."""
    if not addresses:
        raise CallbackRefused(
            f"callback_url host {target.host!r} resolves to no address; check the name."
        )
    if allow_private:
        return
    for address in addresses:
        problem = address_problem(address)
        if problem is not None:
            # Any bad address refuses the target: which one a connection takes is not ours
            # to choose once the name is handed to a resolver.
            raise CallbackRefused(
                f"callback_url host {target.host!r} resolves to {address}, {problem}: "
                f"Sluice only calls public addresses. Use a publicly reachable URL, "
                f"{_ALLOW_PRIVATE_HINT}."
            )
