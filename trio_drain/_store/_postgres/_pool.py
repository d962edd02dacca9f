"""Connections to the PostgreSQL server: a small pool used from worker threads,
errors translated at the boundary, and the answer to a COMMIT whose
acknowledgement was lost (`txid_status`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from psycopg.pq import TransactionStatus

from ..._errors import StoreClosed, StoreError, StoreUnavailable
from .._base import (
    Durability,
)
from ._wire import ROLLBACK, Wire

T = TypeVar("T")
log = logging.getLogger("trio_drain.postgres")


def describe(dsn: str) -> str:
    """host:port/dbname of a connection string, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"postgresql://{host}:{port}/{info.get('dbname') or ''}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def translate(exc: psycopg.Error, where: str) -> StoreError:
    text = first_line(exc)
    if isinstance(
        exc, (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
    ):
        return StoreUnavailable(f"the PostgreSQL outbox at {where} is unavailable: {text}")
    return StoreError(f"PostgreSQL outbox error at {where}: {text}")


_SETTLE_TIMEOUT = 5.0


_SETTLE_PATIENCE = 0.2


@attrs.define(eq=False)
class Commit:
    """A transaction of the worker's (a claim or outcomes), followed so that
    a COMMIT whose answer is lost can be settled.

    Attributes:
        xid: its transaction id (`txid_current()`), set by its statements
            once it has changed a row; None while it has changed nothing.
        pid: the server process of the connection that ran it.
        value: what it returned, had it committed.
        unsettled: its COMMIT went unanswered and nobody could tell yet
            whether it was applied.
        committing: its COMMIT was sent (set by `Wire.commit`).
    """

    xid: int | None = None
    pid: int | None = None
    value: Any = None
    unsettled: bool = False
    #: COMMIT was sent (on the wire: `Wire.commit`).
    committing: bool = False


def committed(conn: psycopg.Connection[Any], commit: Commit) -> bool:
    """Whether transaction `commit.xid` committed (False: it rolled back).

    While it is still in progress (its session has not noticed that its
    client is gone), waits; after a moment ends that session, which settles
    it either way. Raises StoreUnavailable if it is still open after
    `_SETTLE_TIMEOUT`.
    """
    assert commit.xid is not None
    start = time.monotonic()
    delay = 0.002
    ended = False
    while True:
        try:
            with conn.transaction():  # (a savepoint, when called inside a transaction)
                status = conn.execute("SELECT txid_status(%s)", (commit.xid,)).fetchone()
        except psycopg.errors.InvalidParameterValue:
            # "in the future": the server lost the end of its WAL in a crash
            # (commits without a WAL flush), and the transaction with it.
            return False
        if status is None or status[0] is None:
            raise StoreUnavailable(f"cannot tell whether transaction {commit.xid} committed")
        if status[0] == "committed":
            return True
        if status[0] == "aborted":
            return False
        elapsed = time.monotonic() - start
        if elapsed >= _SETTLE_TIMEOUT:
            raise StoreUnavailable(
                f"transaction {commit.xid} is still in progress {elapsed:.1f}s after its connection"
                " dropped; its rows stay as they are until their lease expires"
            )
        if not ended and elapsed >= _SETTLE_PATIENCE and commit.pid is not None:
            ended = True
            try:  # only that session, and only while it still runs that transaction
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = %s AND backend_xid::text = %s",
                        (commit.pid, str(commit.xid % 2**32)),
                    )
            except psycopg.errors.InsufficientPrivilege:
                pass  # wait for it to notice on its own
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Pool:
    """Up to `size` connections, each used by one task or thread at a time.

    Connections open lazily and are thrown away when they fail, so the next
    caller reconnects: a server restart needs no special handling. `run`
    hands one to a function in a worker thread (psycopg's sync API);
    `exchange` drives one from Trio through its libpq handle (`_wire`).
    """

    def __init__(self, dsn: str, *, size: int, durability: Durability) -> None:
        self.dsn = dsn
        self.where = describe(dsn)
        self.durability = durability
        self.size = size
        self._idle: list[Wire] = []
        self._limiter = trio.CapacityLimiter(size)
        self._lost = False  # a connection failed and none has worked since
        self.closed = False

    def connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection (blocking: call from a thread)."""
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=5,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                application_name="trio-drain",
            )
        except psycopg.Error as exc:
            raise translate(exc, self.where) from None
        # The wire's statements are prepared on the server under names of
        # their own; psycopg's (prepared after a few runs) would have it
        # deallocate every prepared statement at a ROLLBACK.
        conn.prepare_threshold = None
        # Ordering lanes rely on each statement seeing what committed
        # before its lane's lock was granted: READ COMMITTED, whatever the
        # server's or the role's default (a snapshot taken at the
        # transaction's first statement could see an empty lane that
        # another transaction has just filled).
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED")
        if self.durability == "normal":
            conn.execute("SET synchronous_commit = off")
        return conn

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T], commit: Commit | None = None) -> T:
        """Run `fn` in one transaction on a pooled connection, in a thread.

        With `commit`, whose `xid` `fn` sets from its statements, a COMMIT
        whose answer is lost to a dropped connection is settled: a new
        connection asks the server what became of the transaction, and the
        caller gets `fn`'s value if it committed (StoreUnavailable, with
        nothing changed, if it rolled back; StoreUnavailable with
        `commit.unsettled` set if the server cannot be asked).
        """
        if self.closed:
            raise StoreClosed("the outbox is closed")
        async with self._limiter:
            box = [self._idle.pop() if self._idle else None]
            try:
                result = await trio.to_thread.run_sync(self._run_sync, box, fn, commit)
            finally:
                if box[0] is not None:
                    self._idle.append(box[0])
        self._reached()
        return result

    async def exchange(self, fn: Callable[[Wire], Awaitable[T]], commit: Commit | None = None) -> T:
        """Run `fn` on a pooled connection's wire, from Trio (no thread).

        `fn` sends its statements and reads their answers; it is never
        abandoned half-way (cancellation waits for it). A transaction it
        leaves open after an error is rolled back. With `commit`, a COMMIT
        whose answer is lost (`fn` commits with `Wire.commit`) is settled as
        `run` does.
        """
        if self.closed:
            raise StoreClosed("the outbox is closed")
        async with self._limiter:
            box = [self._idle.pop() if self._idle else None]
            try:
                with trio.CancelScope(shield=True):
                    result = await self._exchange(box, fn, commit)
            finally:
                if box[0] is not None:
                    self._idle.append(box[0])
        self._reached()
        return result

    def _reached(self) -> None:
        if self._lost:
            self._lost = False
            log.warning("PostgreSQL outbox at %s is reachable again", self.where)

    async def _exchange(
        self, box: list[Wire | None], fn: Callable[[Wire], Awaitable[T]], commit: Commit | None
    ) -> T:
        wire = box[0]
        try:
            if wire is None:
                wire = box[0] = Wire(await trio.to_thread.run_sync(self.connect))
            if commit is not None:
                commit.pid = wire.conn.info.backend_pid
            return await fn(wire)
        except psycopg.Error as exc:
            if wire is not None and (wire.broken or isinstance(exc, psycopg.OperationalError)):
                self._drop(box, exc)
            elif wire is not None and wire.conn.info.transaction_status != TransactionStatus.IDLE:
                try:
                    await wire.run(ROLLBACK, ())
                except psycopg.Error as again:
                    self._drop(box, again)
            if (
                commit is not None
                and commit.committing
                and commit.xid is not None
                and isinstance(exc, psycopg.OperationalError)
            ):
                # COMMIT went unanswered: it may have been applied. Find out.
                if await trio.to_thread.run_sync(self._committed, box, commit):
                    return commit.value  # type: ignore[no-any-return]
                raise self._rolled_back_at_commit() from None
            raise translate(exc, self.where) from None
        except StoreUnavailable:
            self._lost = True
            raise

    def _rolled_back_at_commit(self) -> StoreUnavailable:
        """What a transaction whose COMMIT went unanswered, and which did not
        commit, is reported as."""
        return StoreUnavailable(
            f"the PostgreSQL outbox at {self.where} lost the connection at commit; the"
            " transaction rolled back and changed nothing"
        )

    def _drop(self, box: list[Wire | None], exc: BaseException) -> None:
        """Throw away the connection in `box`, which failed."""
        wire = box[0]
        box[0] = None
        if wire is not None:
            wire.conn.close()
        if not self._lost:
            self._lost = True
            log.warning(
                "lost a connection to the PostgreSQL outbox at %s (%s); reconnecting on next use",
                self.where,
                first_line(exc),
            )

    def _run_sync(
        self,
        box: list[Wire | None],
        fn: Callable[[psycopg.Connection[Any]], T],
        commit: Commit | None,
    ) -> T:
        wire = box[0]
        committing = False
        try:
            if wire is None:
                wire = box[0] = Wire(self.connect())
            conn = wire.conn
            if commit is not None:
                commit.pid = conn.info.backend_pid
            with conn.transaction():
                value = fn(conn)
                committing = True  # only COMMIT is left
            return value
        except psycopg.Error as exc:
            if wire is not None and (wire.conn.broken or isinstance(exc, psycopg.OperationalError)):
                self._drop(box, exc)
            if (
                committing
                and commit is not None
                and commit.xid is not None
                and isinstance(exc, psycopg.OperationalError)
            ):
                # COMMIT went unanswered: it may have been applied. Find out.
                commit.value = value
                if self._committed(box, commit):
                    return value
                raise self._rolled_back_at_commit() from None
            raise translate(exc, self.where) from None
        except StoreUnavailable:
            self._lost = True
            raise

    def _committed(self, box: list[Wire | None], commit: Commit) -> bool:
        """Whether the transaction `commit.xid` committed, asked on a new
        connection (left in `box`). Raises StoreUnavailable, marking
        `commit.unsettled`, when that cannot be told."""
        try:
            conn = self.connect()
            box[0] = Wire(conn)
            return committed(conn, commit)
        except StoreUnavailable:
            commit.unsettled = True
            raise
        except psycopg.Error as exc:
            commit.unsettled = True
            if box[0] is not None:
                box[0].conn.close()
                box[0] = None
            raise translate(exc, self.where) from None

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.move_on_after(30, shield=True):
            # Take every slot: statements in progress finish first (they are
            # never abandoned), and no new one starts.
            for _ in range(int(self._limiter.total_tokens)):
                await self._limiter.acquire_on_behalf_of(object())
            idle, self._idle = self._idle, []

            def close() -> None:
                for wire in idle:
                    wire.conn.close()

            await trio.to_thread.run_sync(close)
