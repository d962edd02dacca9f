"""The PostgreSQL outbox's schema: the table, its migration, and the server version it needs."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors

from ..._errors import StoreError
from .._base import (
    COLUMNS,
    schema_version,
)
from .._upgrade import upgrade

# Any constant: serialises schema migrations of processes starting together.
_MIGRATION_LOCK = 0x7472696F647261  # "triodra"


COLUMN_TYPES: dict[str, str] = {
    "id": "text",
    "client_message_id": "text",
    "request_fingerprint": "bytea",
    "payload": "bytea",
    "enqueued_at": "bigint",
    "attempts": "integer",
    "next_attempt_at": "bigint",
    "status": "text",
    "last_error": "text",
    "delivered_at": "bigint",
    "broker_message_id": "text",
    "aborted_at": "bigint",
    "aborted_by": "text",
    "superseded_by": "text",
    "mesh": "text",
    "target_spec": "text",
    "nonce": "text",
    "ciphertext": "text",
    "priority": "text",
    "sender_session_pubkey": "text",
    "lease_expires_at": "bigint",
    "lease_token": "text",
    "ordering_key": "text",
}
assert tuple(COLUMN_TYPES) == COLUMNS


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id                    TEXT PRIMARY KEY,
    client_message_id     TEXT NOT NULL UNIQUE,
    request_fingerprint   BYTEA NOT NULL,
    payload               BYTEA NOT NULL,
    enqueued_at           BIGINT NOT NULL,
    attempts              INTEGER NOT NULL DEFAULT 0,
    next_attempt_at       BIGINT NOT NULL,
    status                TEXT NOT NULL
        CHECK (status IN ('pending', 'inflight', 'done', 'dead', 'aborted')),
    last_error            TEXT,
    delivered_at          BIGINT,
    broker_message_id     TEXT,
    aborted_at            BIGINT,
    aborted_by            TEXT,
    superseded_by         TEXT,
    mesh                  TEXT,
    target_spec           TEXT,
    nonce                 TEXT,
    ciphertext            TEXT,
    priority              TEXT,
    sender_session_pubkey TEXT,
    lease_expires_at      BIGINT,
    lease_token           TEXT,
    priority_rank         SMALLINT GENERATED ALWAYS AS
        (CASE priority WHEN 'now' THEN 0 WHEN 'low' THEN 2 ELSE 1 END) STORED
)
"""


#: The oldest PostgreSQL this SQL runs on: stored generated columns
#: (priority_rank) came in 12; txid_status (lost commits) in 10; FOR UPDATE
#: SKIP LOCKED and ON CONFLICT in 9.5.
MIN_POSTGRES = 120000


def version_text(number: int) -> str:
    """PostgreSQL's server_version_num as people write it (120000 is 12.0)."""
    if number >= 100000:
        return f"{number // 10000}.{number % 10000}"
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def check_server_version(conn: psycopg.Connection[Any]) -> None:
    """Refuse a server too old for the outbox's SQL."""
    found = conn.info.server_version
    if found < MIN_POSTGRES:
        raise StoreError(
            f"the PostgreSQL server is version {version_text(found)}; trio-drain needs"
            f" {version_text(MIN_POSTGRES)} or newer (stored generated columns)"
        )


def migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the schema; processes starting together take turns."""
    check_server_version(conn)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    version = schema_version(conn)
    if version < 1:
        conn.execute(_CREATE_TABLE)
    upgrade(conn, version, mark="%s")
