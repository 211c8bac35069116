"""`SLUICE_AMQP_URL` as a list: one broker, or the nodes of one cluster, comma separated.

Passwords sit inside these URLs, so anything that names a broker in a log line or an error
message names it through `redacted`.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("amqp", "amqps")


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list, in order; raises `ValueError` naming a bad one."""
    urls = tuple(part.strip() for part in value.split(",") if part.strip())
    if not urls:
        raise ValueError("SLUICE_AMQP_URL is empty: give at least one amqp:// URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(
                f"SLUICE_AMQP_URL entry {redacted(url)!r} is not an amqp:// or amqps:// URL "
                "with a host; several brokers are separated by commas, "
                "e.g. amqp://user:pass@node1:5672/,amqp://user:pass@node2:5672/"
            )
    return urls


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`, fit for a log line."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Unparseable (a bad port, say): say nothing of what may be a secret.
        return "<unparseable URL>"
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
