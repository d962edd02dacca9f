"""Reads written once for both SQL back ends: a row by id, listings and
counts by an operator's filter, short ids.

They differ between SQLite and PostgreSQL only in the placeholder, in whose
clock judges an age, and in how a statement reaches a connection; a back
end states those (`SqlReads`' abstract methods, the dialect) and inherits
the rest. The operator's changes build on them (`_operations`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs

from .._lifecycle import Bound
from .._model import OutboxRow, Status
from ._base import COLUMNS, Rows, row_from_values
from ._sql import Dialect

T = TypeVar("T")

SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM outbox"

#: A row's place in accept order, (enqueued_at, id): the cursor of listings
#: and bulk actions (several rows may share one enqueued_at).
Cursor = tuple[int, str]
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


class SqlReads(ABC):
    """The `OutboxBackend` reads that are the same SQL on every back end."""

    dialect: Dialect

    @abstractmethod
    async def _read(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` where reads may run alongside writes."""

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
