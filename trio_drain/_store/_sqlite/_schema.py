"""The SQLite outbox's schema: creating, migrating and checking the file before use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..._errors import (
    CorruptDatabase,
    StoreError,
)
from .._base import (
    Durability,
    schema_version,
)
from .._upgrade import upgrade

# The table as the seed's daemon wrote it, plus the lease columns.
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id                    TEXT PRIMARY KEY,
    client_message_id     TEXT NOT NULL UNIQUE,
    request_fingerprint   BLOB NOT NULL,
    payload               BLOB NOT NULL,
    enqueued_at           INTEGER NOT NULL,
    attempts              INTEGER NOT NULL DEFAULT 0,
    next_attempt_at       INTEGER NOT NULL,
    status                TEXT NOT NULL
        CHECK (status IN ('pending', 'inflight', 'done', 'dead', 'aborted')),
    last_error            TEXT,
    delivered_at          INTEGER,
    broker_message_id     TEXT,
    aborted_at            INTEGER,
    aborted_by            TEXT,
    superseded_by         TEXT,
    mesh                  TEXT,
    target_spec           TEXT,
    nonce                 TEXT,
    ciphertext            TEXT,
    priority              TEXT,
    sender_session_pubkey TEXT,
    lease_expires_at      INTEGER,
    lease_token           TEXT
)
"""


# Columns a table written by an older daemon may lack, added in place.
_ADDED_COLUMNS = {
    "mesh": "TEXT",
    "target_spec": "TEXT",
    "nonce": "TEXT",
    "ciphertext": "TEXT",
    "priority": "TEXT",
    "sender_session_pubkey": "TEXT",
    "lease_expires_at": "INTEGER",
    "lease_token": "TEXT",
}


# Claim order as a column, so one partial index serves the claim query.
_ADD_PRIORITY_RANK = (
    "ALTER TABLE outbox ADD COLUMN priority_rank INTEGER GENERATED ALWAYS AS"
    " (CASE priority WHEN 'now' THEN 0 WHEN 'low' THEN 2 ELSE 1 END) VIRTUAL"
)


#: The oldest SQLite this SQL runs on: RETURNING (claims) came in 3.35.0 and
#: its early defects were fixed by 3.35.5; UPDATE ... FROM (completions)
#: needs 3.33.0, generated columns (priority_rank) 3.31.0, PRAGMA
#: table_xinfo (migration) 3.26.0 and ON CONFLICT DO NOTHING (accept) 3.24.0.
MIN_SQLITE = (3, 35, 5)


def check_sqlite_version() -> None:
    """Refuse an SQLite library too old for the outbox's SQL, before any file
    is touched (it would otherwise fail every claim, and the worker retry
    it forever)."""
    found = tuple(sqlite3.sqlite_version_info)
    if found < MIN_SQLITE:
        raise StoreError(
            f"the SQLite library is version {sqlite3.sqlite_version}; trio-drain needs"
            f" {'.'.join(map(str, MIN_SQLITE))} or newer (RETURNING, UPDATE ... FROM, generated"
            " columns): use a Python built against a newer SQLite"
        )


def connect(path: Path, durability: Durability) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise StoreError(f"{path}: cannot switch to WAL journal mode (got {mode})")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    return conn


def check_integrity(path: Path) -> None:
    """Refuse a corrupt file, reading it without writing a byte."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        raise CorruptDatabase(f"{path} is not a usable SQLite database: {exc}") from None
    finally:
        conn.close()
    if result != ["ok"]:
        # SQLite's report may hold several lines an entry: one line of it.
        found = [line.strip() for entry in result for line in str(entry).splitlines() if line.strip()]
        raise CorruptDatabase(f"{path} failed its integrity check: {'; '.join(found[:3])}")


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema in one transaction.

    The version lives in its own table rather than `PRAGMA user_version`,
    which the seed's daemon may use for its other tables.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        if version < 1:
            conn.execute(_CREATE_TABLE)
            present = {r[1] for r in conn.execute("PRAGMA table_xinfo(outbox)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    conn.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
            if "priority_rank" not in present:
                conn.execute(_ADD_PRIORITY_RANK)
        upgrade(conn, version, mark="?")
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise
