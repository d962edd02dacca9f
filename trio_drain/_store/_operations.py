"""Reads and operator actions, written once for both SQL back ends.

They differ between SQLite and PostgreSQL only in the placeholder, in how a
row is locked for an operator's change, in how a requeued row's successor
is inserted (PostgreSQL stamps it with the server's clock and notifies the
workers), and in how a statement reaches a connection. A back end states
those and inherits the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import _lifecycle
from .._errors import UnknownRow
from .._model import OutboxRow, Status
from ._base import COLUMNS, Rows, row_from_values
from ._lanes import lane_keys, settle
from ._sql import Dialect

T = TypeVar("T")

SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM outbox"


class SqlOperations(ABC):
    """The `OutboxBackend` methods that are the same SQL on every back end."""

    dialect: Dialect
    #: What makes an operator's read of a row hold it until the change is
    #: written: PostgreSQL's row lock; SQLite's write transaction already does.
    lock_for_update: str = ""

    @abstractmethod
    async def _read(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` where reads may run alongside writes."""

    @abstractmethod
    async def _write(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` in a durable write transaction."""

    @abstractmethod
    def _insert_successor(self, conn: Any, row: OutboxRow) -> OutboxRow:
        """Insert a requeued row's successor; return it as stored."""

    # -- reading

    async def get(self, row_id: str) -> OutboxRow | None:
        return await self._one("id", row_id)

    async def get_by_client_id(self, client_message_id: str) -> OutboxRow | None:
        return await self._one("client_message_id", client_message_id)

    async def _one(self, column: str, value: str) -> OutboxRow | None:
        sql = f"{SELECT} WHERE {column} = {self.dialect.mark}"

        def op(conn: Any) -> OutboxRow | None:
            found = conn.execute(sql, (value,)).fetchone()
            return None if found is None else row_from_values(found)

        return await self._read(op)

    async def list(self, *, status: Status | None, limit: int, before: int | None = None) -> Rows:
        """Rows newest first (by enqueued_at), optionally of one status."""
        mark = self.dialect.mark
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append(f"status = {mark}")
            args.append(status.value)
        if before is not None:
            where.append(f"enqueued_at < {mark}")
            args.append(before)
        sql = SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY enqueued_at DESC, id DESC LIMIT {mark}"

        def op(conn: Any) -> Rows:
            return [row_from_values(r) for r in conn.execute(sql, [*args, limit])]

        return await self._read(op)

    async def counts(self) -> dict[str, int]:
        def op(conn: Any) -> dict[str, int]:
            counts = dict.fromkeys((s.value for s in Status), 0)
            for status, n in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
                counts[status] = int(n)
            return counts

        return await self._read(op)

    # -- operator actions

    async def requeue(
        self, row_id: str, *, now: int, new_id: str, new_client_message_id: str, by: str
    ) -> OutboxRow:
        """Abort the row and insert its pending successor; return the successor.

        The successor joins the end of the row's ordering lane; the lane's
        next row goes if the aborted row was its head."""

        def op(conn: Any) -> OutboxRow:
            keys = self._lock_lane_of(conn, row_id)
            aborted, successor = _lifecycle.requeued(
                self._locked_row(conn, row_id),
                now=now,
                new_id=new_id,
                new_client_message_id=new_client_message_id,
                by=by,
            )
            stored = self._insert_successor(conn, successor)
            self._write_aborted(conn, aborted)
            settle(conn, self.dialect, keys)
            return stored

        return await self._write(op)

    async def drop(self, row_id: str, *, now: int, by: str) -> OutboxRow:
        def op(conn: Any) -> OutboxRow:
            keys = self._lock_lane_of(conn, row_id)
            aborted = _lifecycle.dropped(self._locked_row(conn, row_id), now=now, by=by)
            self._write_aborted(conn, aborted)
            settle(conn, self.dialect, keys)
            if keys:
                self._tell_workers(conn)  # the lane's next row may go
            return aborted

        return await self._write(op)

    def _lock_lane_of(self, conn: Any, row_id: str) -> Sequence[str]:
        """The row's lane, its lock taken (PostgreSQL) before the row's own."""
        found = conn.execute(
            f"SELECT ordering_key FROM outbox WHERE id = {self.dialect.mark}", (row_id,)
        ).fetchone()
        keys = lane_keys([None if found is None else found[0]])
        self._lock_lanes(conn, keys)
        return keys

    @abstractmethod
    def _tell_workers(self, conn: Any) -> None:
        """Wake the workers of other processes when this transaction commits
        (PostgreSQL's NOTIFY; SQLite's workers find it at their next poll)."""

    @abstractmethod
    def _lock_lanes(self, conn: Any, keys: Sequence[str]) -> None:
        """Serialise the transactions that change these lanes, before any
        row lock of this transaction's."""

    # -- paused routes

    async def pause(self, route: str, *, now: int, by: str) -> bool:
        """Pause `route` (``mesh:<slug>`` or ``session:<pubkey>``); False if it already was."""
        mark = self.dialect.mark

        def op(conn: Any) -> bool:
            found = conn.execute(
                f"INSERT INTO trio_drain_paused (route, paused_at, paused_by) VALUES ({mark}, {mark}, {mark})"
                " ON CONFLICT (route) DO NOTHING",
                (route, now, by),
            )
            return bool(found.rowcount == 1)

        return await self._write(op)

    async def resume(self, route: str) -> bool:
        """Resume `route`; False if it was not paused."""

        def op(conn: Any) -> bool:
            found = conn.execute(f"DELETE FROM trio_drain_paused WHERE route = {self.dialect.mark}", (route,))
            self._tell_workers(conn)
            return bool(found.rowcount == 1)

        return await self._write(op)

    async def paused(self) -> dict[str, tuple[int, str]]:
        """Paused routes: name -> (paused_at, paused_by)."""

        def op(conn: Any) -> dict[str, tuple[int, str]]:
            found = conn.execute("SELECT route, paused_at, paused_by FROM trio_drain_paused").fetchall()
            return {route: (int(at), by) for route, at, by in found}

        return await self._read(op)

    async def prune(self, *, delivered_before: int) -> int:
        sql = f"DELETE FROM outbox WHERE status = 'done' AND delivered_at < {self.dialect.mark}"

        def op(conn: Any) -> int:
            return int(conn.execute(sql, (delivered_before,)).rowcount)

        return await self._write(op)

    def _locked_row(self, conn: Any, row_id: str) -> OutboxRow:
        found = conn.execute(
            f"{SELECT} WHERE id = {self.dialect.mark}{self.lock_for_update}", (row_id,)
        ).fetchone()
        if found is None:
            raise UnknownRow(f"no outbox row has id {row_id!r}")
        return row_from_values(found)

    def _write_aborted(self, conn: Any, row: OutboxRow) -> None:
        """Persist an operator's abort (from `_lifecycle.requeued` or `dropped`)."""
        mark = self.dialect.mark
        conn.execute(
            f"UPDATE outbox SET status = 'aborted', aborted_at = {mark}, aborted_by = {mark},"
            f" superseded_by = {mark}, lease_token = NULL, lease_expires_at = NULL WHERE id = {mark}",
            (row.aborted_at, row.aborted_by, row.superseded_by, row.id),
        )
