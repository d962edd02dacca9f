"""The schema's steps after version 1, the same on SQLite and PostgreSQL.

Each back end creates (or adopts) the version 1 table its own way, then
calls `upgrade` inside the migration's transaction.
"""

from __future__ import annotations

from ._base import INDEXES, SCHEMA_2, SCHEMA_3, SCHEMA_VERSION, Executes, record_schema_version
from ._lanes import repair as repair_lanes


def upgrade(conn: Executes, version: int, *, mark: str) -> None:
    """Bring an outbox at schema `version` (1 or later) to `SCHEMA_VERSION`;
    `mark` is the driver's placeholder (? or %s)."""
    if version < 2:
        for statement in SCHEMA_2:
            conn.execute(statement)
    if version < 3:
        for statement in SCHEMA_3:
            conn.execute(statement)
    if version == 2:
        repair_lanes(conn, mark)
    if version < SCHEMA_VERSION:
        for statement in INDEXES:
            conn.execute(statement)
        record_schema_version(conn, mark=mark)
