"""Schema migrations for Sluice's PostgreSQL backends (the pgvector index, the job store).

Each component (a backend) lists its migrations in order; migration `n` takes the schema
from version `n - 1` to `n`. `migrate` runs the ones a database lacks, in one transaction
that holds a transaction-scoped advisory lock, so when several processes start at once on
an empty database exactly one creates the schema and the others wait, then find it done.
The versions live in `sluice_schema_versions`, one row per component.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

# Every Sluice process on a database agrees on this key (ASCII "sluice" as an int64). The
# lock is per database, so deployments in other databases of one server never wait on it.
SCHEMA_LOCK_KEY = 0x736C75696365

# A migration step: SQL to run as it stands, or a function given the connection (for steps
# that must look at the database first).
Step = str | sql.Composed | Callable[["psycopg.Connection[Any]"], None]


def migrate(conn: psycopg.Connection[Any], component: str, steps: Sequence[Step]) -> int:
    """Bring `component`'s schema up to version `len(steps)`; returns the version it is at."""
    # One transaction: DDL is transactional in PostgreSQL, so a migration that fails half way
    # leaves nothing behind. A database at a newer version than `steps` knows is left alone:
    # migrations only ever add, so a process of the previous release keeps working during a
    # rolling upgrade.
    with conn.transaction():
        lock_schema(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sluice_schema_versions"
            " (component text PRIMARY KEY, version int NOT NULL)"
        )
        current = schema_version(conn, component)
        for number in range(current + 1, len(steps) + 1):
            step = steps[number - 1]
            if callable(step):
                step(conn)
            else:
                conn.execute(step)
        target = max(current, len(steps))
        if target != current:
            conn.execute(
                "INSERT INTO sluice_schema_versions (component, version) VALUES (%s, %s)"
                " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                (component, target),
            )
    return target


def lock_schema(conn: psycopg.Connection[Any]) -> None:
    """Hold the schema lock until the current transaction ends (for DDL outside `migrate`)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))


def schema_version(conn: psycopg.Connection[Any], component: str) -> int:
    """The version `component`'s schema is at in this database (0: none yet)."""
    exists = conn.execute("SELECT to_regclass('sluice_schema_versions') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute(
        "SELECT version FROM sluice_schema_versions WHERE component = %s", (component,)
    ).fetchone()
    return int(row[0]) if row else 0


class SchemaOnce:
    """A component's schema, made the first time a process needs it and never again.

    A process may start before its database answers: a failed attempt raises, and the next
    call tries again. Threads that arrive together wait for one attempt.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0

    def ensure(self, make: Callable[[], int]) -> int:
        """Run `make` (connect and `migrate`) unless it already succeeded; the version."""
        if not self.version:
            with self._lock:
                if not self.version:
                    self.version = make()
        return self.version
