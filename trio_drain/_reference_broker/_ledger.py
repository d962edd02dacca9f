"""What the reference broker accepted, kept in SQLite when given a file so dedupe survives a restart."""

from __future__ import annotations

import collections
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import trio

from .._clock import wall_clock_ms
from .._store._group_commit import GroupCommitter


@attrs.frozen
class Acceptance:
    """One send the broker took, to persist before it is acked."""

    mesh: str
    client_message_id: str
    fingerprint: str
    message_id: str
    target: str
    ack_id: Any  # the send frame's id, echoed in the ack
    previous: tuple[str, str] | None = None  # what was there before, for a copy (no dedupe)

    @property
    def key(self) -> tuple[str, str]:
        """The dedupe key: (meshId, client_message_id)."""
        return (self.mesh, self.client_message_id)


class Ledger:
    """What the broker accepted: (mesh, client id) -> (fingerprint, message id),
    and how many times (more than once only where it does not dedupe)."""

    def __init__(self, path: Path | None) -> None:
        self.entries: dict[tuple[str, str], tuple[str, str]] = {}
        self.copies: collections.Counter[tuple[str, str]] = collections.Counter()
        # Acceptances still being written: a resend of one must wait for it,
        # or we would ack a duplicate of something a crash could forget.
        self.unwritten: dict[tuple[str, str], trio.Event] = {}
        self._committer: GroupCommitter | None = None
        if path is not None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS accepted (mesh TEXT NOT NULL, client_message_id TEXT NOT NULL,"
                " fingerprint TEXT NOT NULL, message_id TEXT NOT NULL, target TEXT, received_at INTEGER,"
                " copies INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (mesh, client_message_id))"
            )
            if "copies" not in {c[1] for c in conn.execute("PRAGMA table_info(accepted)")}:  # older file
                conn.execute("ALTER TABLE accepted ADD COLUMN copies INTEGER NOT NULL DEFAULT 1")
            for mesh, cid, fp, mid, copies in conn.execute(
                "SELECT mesh, client_message_id, fingerprint, message_id, copies FROM accepted"
            ):
                self.entries[(mesh, cid)] = (fp, mid)
                self.copies[(mesh, cid)] = copies
            self._committer = GroupCommitter(conn, durable=False)

    @property
    def persistent(self) -> bool:
        """Whether acceptances are written to a file (else they live in memory only)."""
        return self._committer is not None

    async def record(self, a: Acceptance) -> None:
        """Persist one acceptance before it is acked (concurrent calls share a commit)."""
        if self._committer is None:
            return
        row = (a.mesh, a.client_message_id, a.fingerprint, a.message_id, a.target, wall_clock_ms())

        def insert(conn: sqlite3.Connection) -> None:
            # A key already there is a copy accepted again (a broker that
            # does not dedupe): count it, keep the newest message id.
            conn.execute(
                "INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (mesh, client_message_id)"
                " DO UPDATE SET copies = copies + 1, message_id = excluded.message_id",
                row,
            )

        await self._committer.submit(insert, durable=False)

    async def aclose(self) -> None:
        """Wait out writes in progress, then close the database."""
        if self._committer is not None:
            with trio.CancelScope(shield=True):
                await self._committer.aclose()
