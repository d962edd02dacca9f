"""The SQLite back end: one file, WAL, group commit, no blocking call on Trio.

Threading model: one write connection, used by a writer thread of the
store's own or, for a quick write while that thread is idle, by the Trio
thread (`_group_commit`), never by both at once; and one read connection,
used only through `trio.to_thread.run_sync` under a limiter of one
(`check_same_thread=False` is safe under those rules). Writes are never
abandoned on cancellation.

Group commit (`_group_commit`): every write is an operation queued for
the writer thread, and what is queued while it is busy goes in the next
transaction, so N concurrent `accept` calls share one fsync. SQLite's
errors become ours in `_errors`; the schema is in `_schema`, the statements in
`_statements`.

Only what a caller was promised needs an fsync: accepted rows and operator
actions. The worker's claims and completions commit without one, since
losing them to a power cut is harmless (the row is claimed again, or sent
again and deduped by the broker). A batch is fsynced if any of its
operations needs it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import attrs
import trio

from ... import _lifecycle
from ..._errors import (
    StoreClosed,
    StoreError,
)
from ..._lifecycle import (
    AT_ATTEMPT_CAP,
    LANE_HOLD_RAN_OUT,
    LEASE_RAN_OUT,
    PAST_MAX_AGE,
    WAITING,
    Completion,
    UnknownFate,
)
from ..._model import NewRow, OutboxRow, Status
from .._base import (
    NO_FILTER,
    Applied,
    Durability,
    Outcomes,
    RouteFilter,
    Rows,
    check_durability,
    row_values,
)
from .._group_commit import CommitStatistics, GroupCommitter, Joint
from .._lanes import LEAVES_LANE, after_last, last_in_lane_sql, places, release_next, settle_joined
from .._operations import SqlOperations
from .._sql import SQLITE
from ._errors import translated
from ._schema import check_integrity, check_sqlite_version, connect, migrate
from ._statements import INSERT, Insert, claim_rows, claim_statement, complete_rows

T = TypeVar("T")

#: A write of at most this many rows (outcomes, or rows claimed) is quick:
#: it may run on the Trio thread when the writer thread is idle.
QUICK_ROWS = 4


class SqliteBackend(SqlOperations):
    """An outbox in one SQLite file. Build it with `SqliteBackend.open`."""

    dialect = SQLITE

    def __init__(
        self, path: Path, writer: sqlite3.Connection, reader: sqlite3.Connection, *, durability: Durability
    ) -> None:
        self.path = path
        self.durability = durability
        self._writer = writer
        self._reader = reader
        self._committer = GroupCommitter(writer, durable=durability == "full")
        self._read_limiter = trio.CapacityLimiter(1)
        self._closed = False

    # -- opening

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, durability: Durability = "full") -> SqliteBackend:
        check_durability(durability)
        return await trio.to_thread.run_sync(cls._open_sync, Path(path), durability)

    @classmethod
    def _open_sync(cls, path: Path, durability: Durability) -> SqliteBackend:
        check_sqlite_version()
        if path.exists():
            if path.is_dir():
                raise StoreError(f"{path} is a directory, not an outbox database")
            check_integrity(path)
        else:
            if not path.parent.is_dir():
                raise StoreError(f"cannot create {path}: folder {path.parent} does not exist")
            # Created by us, 0600, before SQLite opens it; SQLite gives the WAL
            # and shared-memory files the same mode.
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create {path}: {exc.strerror}") from None
        writer = reader = None
        try:
            with translated():
                writer = connect(path, durability)
                migrate(writer)
                reader = connect(path, durability)
        except BaseException:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            raise
        return cls(path, writer, reader, durability=durability)

    # -- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the outbox is closed")

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        joint: Joint | None = None,
        rows: int | None = None,
    ) -> T:
        """`rows`: how many rows the write touches at most, when known; a
        write of a few may run on the Trio thread (`_group_commit`)."""
        self._check_open()
        quick = rows is not None and rows <= QUICK_ROWS
        return await self._committer.submit(fn, durable=durable, joint=joint, quick=quick)

    async def on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with the write connection on the writer thread, between
        batches and outside any transaction (for settings such as PRAGMAs,
        which must never meet a batch half-way). Not for writes: they
        belong in a transaction."""
        self._check_open()
        return await self._committer.submit(fn, durable=False, bare=True)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()

        def run() -> T:
            with translated():
                return fn(self._reader)

        return await trio.to_thread.run_sync(run, limiter=self._read_limiter)

    def statistics(self) -> CommitStatistics:
        """A snapshot of the group committer's counters: transactions and the writes in them."""
        return self._committer.statistics()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait out a batch in progress; it is never abandoned.
        with trio.CancelScope(shield=True):
            await self._committer.aclose()
            await trio.to_thread.run_sync(self._reader.close, limiter=self._read_limiter)

    # -- accept

    async def accept_many(self, rows: Sequence[NewRow]) -> Outcomes:
        return await self._write(Insert(rows), joint=Insert.jointly)

    # -- the worker's side

    async def claim(
        self,
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> Rows:
        claim = claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: sqlite3.Connection) -> Rows:
            return claim_rows(conn, *claim)

        return await self._write(op, durable=False, rows=limit)

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        def op(conn: sqlite3.Connection) -> Applied:
            return complete_rows(conn, completions)

        return await self._write(op, durable=False, rows=len(completions))

    async def complete_and_claim(
        self,
        completions: Sequence[Completion],
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> tuple[Applied, Rows]:
        claim = claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: sqlite3.Connection) -> tuple[Applied, Rows]:
            return complete_rows(conn, completions), claim_rows(conn, *claim)

        return await self._write(op, durable=False, rows=max(len(completions), limit))

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        ran_out, args = SQLITE.where(LEASE_RAN_OUT, now=now)
        at_cap, cap_args = SQLITE.where(AT_ATTEMPT_CAP, max_attempts=max_attempts)
        hold, hold_args = SQLITE.where(LANE_HOLD_RAN_OUT, now=now)
        # The state machine's two answers, at the attempt cap and below it.
        fates = [
            (_lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=cap), cap) for cap in (True, False)
        ]

        def op(conn: sqlite3.Connection) -> int:
            moved = 0
            for (status, error), cap in fates:
                put_back = status is Status.PENDING  # due at once
                found = conn.execute(
                    f"UPDATE outbox SET status = ?, last_error = ?, next_attempt_at = {'?' if put_back else 'next_attempt_at'},"
                    f" lease_token = NULL, lease_expires_at = NULL WHERE {ran_out}"
                    + (f" AND {at_cap}" if cap else "")
                    + " RETURNING id, ordering_key, enqueued_at",
                    (status.value, error, *([now] if put_back else []), *args, *(cap_args if cap else [])),
                ).fetchall()
                moved += len(found)
                if status in LEAVES_LANE:
                    release_next(conn, SQLITE, places(found))
            # Rows aborted in flight whose leases ran out stop holding their lanes.
            found = conn.execute(
                f"UPDATE outbox SET lease_expires_at = NULL WHERE {hold} RETURNING id, ordering_key, enqueued_at",
                hold_args,
            ).fetchall()
            release_next(conn, SQLITE, places(found))
            return moved

        return await self._write(op, durable=False)

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        past, args = SQLITE.where(PAST_MAX_AGE, now=now, max_age_ms=max_age_ms)

        def op(conn: sqlite3.Connection) -> int:
            found = conn.execute(
                f"UPDATE outbox SET status = 'dead', last_error = ? WHERE {past} RETURNING id, ordering_key, enqueued_at",
                (_lifecycle.EXPIRED, *args),
            ).fetchall()
            release_next(conn, SQLITE, places(found))
            return len(found)

        return await self._write(op, durable=False)

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        waiting, args = SQLITE.where(WAITING, now=now, max_age_ms=max_age_ms)
        routes, route_args = SQLITE.routes(exclude)
        sql = (
            f"SELECT next_attempt_at FROM outbox INDEXED BY outbox_due WHERE {waiting}{routes}"
            " ORDER BY next_attempt_at LIMIT 1"
        )

        def op(conn: sqlite3.Connection) -> int | None:
            found = conn.execute(sql, [*args, *route_args]).fetchone()
            return None if found is None else int(found[0])

        return await self._read(op)

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """Call `wake` when another connection commits to the file (another
        process's accept, an application's `accept_in`): `_watch`, on Linux;
        elsewhere the poll interval finds those rows."""
        from ._watch import watch_commits

        committer = self._committer
        await watch_commits(self.path, wake, writing=lambda: committer._running is not None)

    # -- what SqlOperations needs

    def _lock_lanes(self, conn: sqlite3.Connection, keys: Sequence[str]) -> None:
        pass  # one writer at a time: nothing to serialise

    def _tell_workers(self, conn: sqlite3.Connection) -> None:
        pass  # no cross-process notifications: other processes poll

    def _insert_successor(self, conn: sqlite3.Connection, row: OutboxRow) -> OutboxRow:
        if row.ordering_key is not None:  # it joins the end of its lane
            last = conn.execute(last_in_lane_sql(SQLITE), (row.ordering_key,)).fetchone()
            row = attrs.evolve(row, enqueued_at=after_last(row.enqueued_at, row.id, last))
        conn.execute(INSERT, row_values(row))
        if row.ordering_key is not None:
            settle_joined(conn, [(row.ordering_key, row.enqueued_at, row.id)])
        return row
