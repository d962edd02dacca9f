"""Operator actions written once for both SQL back ends.

On top of the reads (`_reads`), they differ between SQLite and PostgreSQL
only in how a row is locked for an operator's change, in how a requeued
row's successor is inserted (PostgreSQL stamps it with the server's clock
and notifies the workers), in how a lane is locked, and in how a statement
reaches a connection. A back end states those and inherits the rest.

An operator's bulk actions (requeue or drop every row matching a filter,
prune) run in bounded batches, a transaction each, so that they never hold
SQLite's one writer, and the drain waiting behind it, for long; each row's
change is still the state machine's (`_lifecycle.requeued`, `dropped`),
judged on the row as it stands under its lock.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import _lifecycle
from .._errors import UnknownRow
from .._model import OutboxRow, Status
from ._base import Rows, row_from_values
from ._lanes import lane_keys, release_next
from ._reads import EVERY_ROW, SELECT, SETTLED_AT, RowFilter, SqlReads

T = TypeVar("T")

#: Rows an operator's bulk requeue or drop changes in one transaction.
CHANGE_BATCH = 200
#: Rows `prune` deletes in one transaction.
PRUNE_BATCH = 1000

#: What `requeue_many` did: (aborted row, its successor) a row.
Requeued = list[tuple[OutboxRow, OutboxRow]]


class SqlOperations(SqlReads):
    """The `OutboxBackend` methods that are the same SQL on every back end:
    the reads (`SqlReads`) and the operator's changes."""

    #: What makes an operator's read of a row hold it until the change is
    #: written: PostgreSQL's row lock; SQLite's write transaction already does.
    lock_for_update: str = ""

    @abstractmethod
    async def _write(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` in a durable write transaction."""

    @abstractmethod
    def _insert_successor(self, conn: Any, row: OutboxRow) -> OutboxRow:
        """Insert a requeued row's successor; return it as stored."""

    # -- operator actions

    async def requeue(
        self, row_id: str, *, now: int, new_id: str, new_client_message_id: str, by: str
    ) -> OutboxRow:
        """Abort the row and insert its pending successor; return the successor.

        The successor joins the end of the row's ordering lane; the lane's
        next row goes if the aborted row was its head."""

        def op(conn: Any) -> OutboxRow:
            self._lock_lane_of(conn, row_id)
            aborted, successor = _lifecycle.requeued(
                self._locked_row(conn, row_id),
                now=now,
                new_id=new_id,
                new_client_message_id=new_client_message_id,
                by=by,
            )
            stored = self._insert_successor(conn, successor)
            self._write_aborted(conn, aborted)
            self._release_next(conn, [aborted])
            return stored

        return await self._write(op)

    async def drop(self, row_id: str, *, now: int, by: str) -> OutboxRow:
        def op(conn: Any) -> OutboxRow:
            keys = self._lock_lane_of(conn, row_id)
            aborted = _lifecycle.dropped(self._locked_row(conn, row_id), now=now, by=by)
            self._write_aborted(conn, aborted)
            self._release_next(conn, [aborted])
            if keys:
                self._tell_workers(conn)  # the lane's next row may go
            return aborted

        return await self._write(op)

    async def requeue_many(
        self,
        row_ids: Sequence[str],
        *,
        now: int,
        new_ids: Sequence[tuple[str, str]],
        by: str,
        where: RowFilter = EVERY_ROW,
    ) -> Requeued:
        """Requeue each row (as `requeue`) that, under its lock, is still
        requeueable and still matches `where`; skip the others. One
        transaction. `new_ids` holds an (id, client_message_id) pair a row.

        Returns:
            (aborted row, successor) for each row requeued, in the order given.
        """

        def op(conn: Any) -> Requeued:
            self._lock_lanes_of(conn, row_ids)
            changed = []
            for row_id, (new_id, new_client_message_id) in zip(row_ids, new_ids, strict=True):
                row = self._locked_row_or_none(conn, row_id)
                if row is None or row.status not in _lifecycle.REQUEUEABLE or not where.admits(row):
                    continue
                aborted, successor = _lifecycle.requeued(
                    row, now=now, new_id=new_id, new_client_message_id=new_client_message_id, by=by
                )
                stored = self._insert_successor(conn, successor)
                self._write_aborted(conn, aborted)
                changed.append((aborted, stored))
            self._release_next(conn, [aborted for aborted, _ in changed])
            return changed

        return await self._write(op)

    async def drop_many(
        self, row_ids: Sequence[str], *, now: int, by: str, where: RowFilter = EVERY_ROW
    ) -> Rows:
        """Drop each row (as `drop`) that, under its lock, is still droppable
        and still matches `where`; skip the others. One transaction.

        Returns:
            The rows dropped, as aborted rows, in the order given.
        """

        def op(conn: Any) -> Rows:
            keys = self._lock_lanes_of(conn, row_ids)
            changed: Rows = []
            for row_id in row_ids:
                row = self._locked_row_or_none(conn, row_id)
                if row is None or row.status not in _lifecycle.DROPPABLE or not where.admits(row):
                    continue
                aborted = _lifecycle.dropped(row, now=now, by=by)
                self._write_aborted(conn, aborted)
                changed.append(aborted)
            self._release_next(conn, changed)
            if changed and keys:
                self._tell_workers(conn)  # the next rows of their lanes may go
            return changed

        return await self._write(op)

    def _release_next(self, conn: Any, left: Sequence[OutboxRow]) -> None:
        """Rows `left` pending and inflight: the next row of a lane goes
        where one of them was its head, unless it still holds its lane
        (aborted in flight: `recover_expired_leases` lets the next go when
        its lease runs out). A successor settles its own lane as it joins it
        (`_insert_successor`)."""
        release_next(
            conn,
            self.dialect,
            [
                (r.ordering_key, r.enqueued_at, r.id)
                for r in left
                if r.ordering_key is not None and r.lease_expires_at is None
            ],
        )

    def _lock_lane_of(self, conn: Any, row_id: str) -> Sequence[str]:
        """The row's lane, its lock taken (PostgreSQL) before the row's own."""
        return self._lock_lanes_of(conn, [row_id])

    def _lock_lanes_of(self, conn: Any, row_ids: Sequence[str]) -> Sequence[str]:
        """The rows' lanes, their locks taken (PostgreSQL), in key order,
        before any row lock."""
        if not row_ids:
            return []
        found = conn.execute(
            f"SELECT DISTINCT ordering_key FROM outbox WHERE id IN ({self.dialect.marks(row_ids)})",
            list(row_ids),
        ).fetchall()
        keys = lane_keys(key for (key,) in found)
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

    async def prune(
        self,
        *,
        older_than_ms: int,
        now: int,
        statuses: frozenset[Status] = frozenset({Status.DONE}),
        limit: int = PRUNE_BATCH,
    ) -> int:
        """Delete up to `limit` rows of `statuses` (done, dead, aborted) that
        settled more than `older_than_ms` ago (`SETTLED_AT`); returns how
        many. One transaction: call again while it returns `limit`."""
        mark = self.dialect.mark
        terms: list[str] = []
        args: list[Any] = []
        for status in sorted(statuses):
            column = SETTLED_AT[status]
            bound, bound_args = self._age_limit(column, older_than_ms, now=now)
            # Never a row that still holds its lane (aborted in flight, its
            # lease running): the sweep that ends the hold releases the next.
            terms.append(f"(status = '{status.value}' AND {column} < {bound} AND lease_expires_at IS NULL)")
            args.extend(bound_args)
        if not terms:
            return 0
        sql = self._sql(
            f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {' OR '.join(terms)} LIMIT {mark})"
        )

        def op(conn: Any) -> int:
            return int(conn.execute(sql, [*args, limit]).rowcount)

        return await self._write(op)

    def _locked_row(self, conn: Any, row_id: str) -> OutboxRow:
        row = self._locked_row_or_none(conn, row_id)
        if row is None:
            raise UnknownRow(f"no outbox row has id {row_id!r}")
        return row

    def _locked_row_or_none(self, conn: Any, row_id: str) -> OutboxRow | None:
        found = conn.execute(
            f"{SELECT} WHERE id = {self.dialect.mark}{self.lock_for_update}", (row_id,)
        ).fetchone()
        return None if found is None else row_from_values(found)

    def _write_aborted(self, conn: Any, row: OutboxRow) -> None:
        """Persist an operator's abort (from `_lifecycle.requeued` or `dropped`)."""
        mark = self.dialect.mark
        conn.execute(
            f"UPDATE outbox SET status = 'aborted', aborted_at = {mark}, aborted_by = {mark},"
            f" superseded_by = {mark}, lease_token = NULL, lease_expires_at = {mark} WHERE id = {mark}",
            (row.aborted_at, row.aborted_by, row.superseded_by, row.lease_expires_at, row.id),
        )
