"""Reads and operator actions, written once for both SQL back ends.

They differ between SQLite and PostgreSQL only in the placeholder, in how a
row is locked for an operator's change, in how a requeued row's successor
is inserted (PostgreSQL stamps it with the server's clock and notifies the
workers), and in how a statement reaches a connection. A back end states
those and inherits the rest.

An operator's bulk actions (requeue or drop every row matching a filter,
prune) run in bounded batches, a transaction each, so that they never hold
SQLite's one writer, and the drain waiting behind it, for long; each row's
change is still the state machine's (`_lifecycle.requeued`, `dropped`),
judged on the row as it stands under its lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs

from .. import _lifecycle
from .._errors import UnknownRow
from .._lifecycle import Bound
from .._model import OutboxRow, Status
from ._base import COLUMNS, Rows, row_from_values
from ._lanes import lane_keys, release_next
from ._sql import Dialect

T = TypeVar("T")

SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM outbox"

#: Rows an operator's bulk requeue or drop changes in one transaction.
CHANGE_BATCH = 200
#: Rows `prune` deletes in one transaction.
PRUNE_BATCH = 1000

#: A row's place in accept order, (enqueued_at, id): the cursor of listings
#: and bulk actions (several rows may share one enqueued_at).
Cursor = tuple[int, str]
#: What `requeue_many` did: (aborted row, its successor) a row.
Requeued = list[tuple[OutboxRow, OutboxRow]]
#: SQL terms (joined by AND) and the arguments they bind, in order.
Terms = tuple[list[str], list[Any]]

#: Where `prune` reads how long ago a row of each status settled: a done
#: row's delivery, an aborted row's abort, a dead row's last due time (the
#: store records no time of death; a row dies at or after it).
SETTLED_AT = {Status.DONE: "delivered_at", Status.ABORTED: "aborted_at", Status.DEAD: "next_attempt_at"}
#: Columns written with the store's clock (PostgreSQL: the server's); the
#: others (delivered_at, aborted_at) carry the clock of the host that wrote them.
_STORE_CLOCK = frozenset({"enqueued_at", "next_attempt_at"})


@attrs.frozen(kw_only=True)
class RowFilter:
    """Which rows an operator's listing or bulk action takes: every field
    that is set narrows it (all unset: every row).

    Attributes:
        statuses: rows in one of these states (empty: any state).
        mesh: rows whose ``mesh`` column is this slug.
        lane: rows of this ordering lane (``ordering_key``).
        error: rows whose ``last_error`` contains this text (case-sensitive).
        older_than_ms: rows enqueued at least this long ago, by the store's
            clock (PostgreSQL: the server's).
    """

    statuses: frozenset[Status] = frozenset()
    mesh: str | None = None
    lane: str | None = None
    error: str | None = None
    older_than_ms: int | None = None

    def __bool__(self) -> bool:
        return bool(self.statuses) or any(
            v is not None for v in (self.mesh, self.lane, self.error, self.older_than_ms)
        )

    def admits(self, row: OutboxRow) -> bool:
        """Whether `row` matches on the fields a row's change can move (its
        status, its error) and those it keeps (mesh, lane): what a bulk
        action checks again under the row's lock. Age is the SQL's to judge."""
        return (
            (not self.statuses or row.status in self.statuses)
            and (self.mesh is None or row.mesh == self.mesh)
            and (self.lane is None or row.ordering_key == self.lane)
            and (self.error is None or self.error in (row.last_error or ""))
        )


EVERY_ROW = RowFilter()


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

    async def list(
        self,
        *,
        status: Status | None = None,
        limit: int,
        before: int | Cursor | None = None,
        after: int | Cursor | None = None,
        where: RowFilter = EVERY_ROW,
        now: int = 0,
        oldest_first: bool = False,
    ) -> Rows:
        """Rows in accept order (newest first unless `oldest_first`) that
        match `where` (and `status`), between the cursors: `before` keeps
        rows accepted before it, `after` rows accepted after it (an int is a
        time in ms, a `Cursor` a row's place). `now` is the caller's clock,
        for `where`'s age."""
        parts, args = self._filter(where, now=now)
        if status is not None:
            parts.append(f"status = '{status.value}'")
        for cursor, compare in ((before, "<"), (after, ">")):
            if cursor is not None:
                term, cursor_args = self._beyond(cursor, compare)
                parts.append(term)
                args.extend(cursor_args)
        order = "ASC" if oldest_first else "DESC"
        sql = self._sql(
            SELECT + _where(parts) + f" ORDER BY enqueued_at {order}, id {order} LIMIT {self.dialect.mark}"
        )

        def op(conn: Any) -> Rows:
            return [row_from_values(r) for r in conn.execute(sql, [*args, limit])]

        return await self._read(op)

    async def count(self, *, where: RowFilter = EVERY_ROW, now: int = 0) -> int:
        """How many rows match `where`."""
        parts, args = self._filter(where, now=now)
        sql = self._sql("SELECT count(*) FROM outbox" + _where(parts))

        def op(conn: Any) -> int:
            return int(conn.execute(sql, args).fetchone()[0])

        return await self._read(op)

    async def with_id_prefix(self, prefix: str, *, limit: int) -> Rows:
        """Rows whose id starts with `prefix`, in id order, at most `limit`.

        A scan of the ids: an operator's look-up, not the drain's. It
        compares characters, not the collation's order, so that it finds
        the same rows on any database."""
        mark = self.dialect.mark
        sql = f"{SELECT} WHERE substr(id, 1, {len(prefix)}) = {mark} ORDER BY id LIMIT {mark}"

        def op(conn: Any) -> Rows:
            return [row_from_values(r) for r in conn.execute(sql, (prefix, limit))]

        return await self._read(op)

    async def short_ids(self, row_ids: Sequence[str], *, minimum: int) -> dict[str, str]:
        """Each id's shortest prefix (at least `minimum` characters) that no
        other row's id starts with; the id itself where none is shorter.

        Judged against the id's neighbours in the table's order of ids (the
        primary key's index: two look-ups an id), as git shortens hashes."""
        mark = self.dialect.mark
        before = f"SELECT max(id) FROM outbox WHERE id < {mark}"
        after = f"SELECT min(id) FROM outbox WHERE id > {mark}"

        def op(conn: Any) -> dict[str, str]:
            short: dict[str, str] = {}
            for row_id in row_ids:
                length = minimum
                for sql in (before, after):
                    (neighbour,) = conn.execute(sql, (row_id,)).fetchone()
                    if neighbour is not None:
                        length = max(length, _common_prefix(row_id, neighbour) + 1)
                short[row_id] = row_id[:length]
            return short

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
        where one of them was its head. (A successor settles its own lane
        as it joins it: `_insert_successor`.)"""
        release_next(
            conn, self.dialect, [(r.ordering_key, r.enqueued_at, r.id) for r in left if r.ordering_key]
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
            terms.append(f"(status = '{status.value}' AND {column} < {bound})")
            args.extend(bound_args)
        if not terms:
            return 0
        sql = self._sql(
            f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {' OR '.join(terms)} LIMIT {mark})"
        )

        def op(conn: Any) -> int:
            return int(conn.execute(sql, [*args, limit]).rowcount)

        return await self._write(op)

    # -- the filter, written once

    def _filter(self, where: RowFilter, *, now: int) -> Terms:
        """`where` as SQL terms (to be joined by AND) and their arguments."""
        mark = self.dialect.mark
        parts: list[str] = []
        args: list[Any] = []
        if where.statuses:  # literals, so the partial indexes by status match
            parts.append("status IN (" + ", ".join(f"'{s.value}'" for s in sorted(where.statuses)) + ")")
        if where.mesh is not None:
            parts.append(f"mesh = {mark}")
            args.append(where.mesh)
        if where.lane is not None:
            parts.append(f"ordering_key = {mark}")
            args.append(where.lane)
        if where.error is not None:
            # A plain substring, the same on both databases (LIKE would read
            # % and _, and differs in case between them).
            parts.append(f"replace(last_error, {mark}, '') <> last_error")
            args.append(where.error)
        if where.older_than_ms is not None:
            bound, bound_args = self._age_limit("enqueued_at", where.older_than_ms, now=now)
            parts.append(f"enqueued_at < {bound}")
            args.extend(bound_args)
        return parts, args

    def _age_limit(self, column: str, age_ms: int, *, now: int) -> tuple[str, Sequence[Any]]:
        """SQL for the time `age_ms` before now, on the clock `column` is written with."""
        if column in _STORE_CLOCK:
            return self.dialect.bound(Bound.AGE_LIMIT, now=now, max_age_ms=age_ms)
        return self.dialect.mark, [now - age_ms]

    def _beyond(self, cursor: int | Cursor, op: str) -> tuple[str, Sequence[Any]]:
        """SQL keeping the rows accepted before (`op` ``<``) or after (``>``) `cursor`."""
        mark = self.dialect.mark
        if isinstance(cursor, int):
            return f"enqueued_at {op} {mark}", [cursor]
        at, row_id = cursor
        # The first term bounds an index range (by status, then enqueued_at):
        # a batch costs its rows, not the table's.
        return (
            f"enqueued_at {op}= {mark} AND (enqueued_at {op} {mark} OR id {op} {mark})",
            [at, at, row_id],
        )

    def _sql(self, sql: str) -> str:
        """`sql` as this back end runs it: PostgreSQL's tests put a stand-in
        for the server's clock in; as it stands elsewhere."""
        return sql

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
            f" superseded_by = {mark}, lease_token = NULL, lease_expires_at = NULL WHERE id = {mark}",
            (row.aborted_at, row.aborted_by, row.superseded_by, row.id),
        )


def _where(parts: Sequence[str]) -> str:
    return " WHERE " + " AND ".join(parts) if parts else ""


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
