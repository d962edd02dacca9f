"""The hot path's statements, sent from Trio straight through libpq.

psycopg's async API does not run on Trio, and its sync API in a worker
thread costs a thread round trip per call: about 90 µs of CPU and 100 of
wall time on the 2-core machines this was measured on, more than the
statement itself. So `accept`, the claim and the outcome writes do not go
through a thread. They run on a pooled psycopg connection's libpq handle
(`pgconn`, non-blocking, as psycopg keeps it), and Trio waits on its
socket: no blocking call runs on the Trio thread.

Each exchange is one pipeline: the statements of a transaction are sent
together, each as a named prepared statement with binary parameters and
binary results (prepared on first use on that connection, in the same
pipeline), and their answers read back after a single round trip.
PostgreSQL runs the statements up to a Sync in one implicit transaction,
so an accept (its lanes' locks, the insert, the lanes' settling) is one
round trip and one commit, and a worker's write is two: its statements,
then COMMIT once their answers (and so its transaction id) are in hand.

An exchange is written once, as steps that say what they wait for (the
socket readable, or writable): `drive` runs them from Trio, and
`drive_blocking` in the calling thread, for `accept_in` on the caller's
own connection. A big batch is a COPY (`_copy`), which libpq runs outside
pipeline mode: `copy_in`, `copy_ready`, `copy_data`, `copy_end`.
"""

from __future__ import annotations

import hashlib
import re
import select
import struct
from collections.abc import Callable, Generator, Iterable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg import pq

if TYPE_CHECKING:
    from ._pool import Commit

T = TypeVar("T")

#: Type OIDs of what the statements bind.
OIDS: dict[str, int] = {
    "text": 25,
    "bytea": 17,
    "bigint": 20,
    "integer": 23,
    "smallint": 21,
    "boolean": 16,
    "text[]": 1009,
    "bytea[]": 1001,
    "bigint[]": 1016,
    "integer[]": 1007,
}
_ELEMENT = {"text[]": 25, "bytea[]": 17, "bigint[]": 20, "integer[]": 23}

BINARY = pq.Format.BINARY

_MARK = re.compile(r"%s")


@attrs.frozen
class Statement:
    """A statement as the wire sends it: `$n` placeholders, its parameters'
    types, and the name it is prepared under on each connection."""

    sql: bytes
    types: tuple[int, ...]
    name: bytes
    #: Whether to prepare it (not worth it for BEGIN and COMMIT).
    prepare: bool = True

    @classmethod
    def of(cls, sql: str, types: Sequence[str], *, prepare: bool = True) -> Statement:
        """`sql` written with psycopg's ``%s`` marks, one per entry of `types`."""
        counter = iter(range(1, len(types) + 1))
        numbered = _MARK.sub(lambda _: f"${next(counter)}", sql)
        if next(counter, None) is not None:
            raise ValueError(f"{sql!r} has fewer marks than the {len(types)} types given")
        oids = tuple(OIDS[t] for t in types)
        digest = hashlib.blake2b(numbered.encode() + repr(oids).encode(), digest_size=10).hexdigest()
        return cls(numbered.encode(), oids, f"trio_drain_{digest}".encode(), prepare)


# -- values to binary parameters, and back


def text(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def int8(value: int | None) -> bytes | None:
    return None if value is None else value.to_bytes(8, "big", signed=True)


def int4(value: int | None) -> bytes | None:
    return None if value is None else value.to_bytes(4, "big", signed=True)


_NULL = b"\xff\xff\xff\xff"
_LENGTH = struct.Struct("!i").pack
_HEADER = struct.Struct("!iiIii").pack


def array(kind: str, values: Sequence[bytes | None]) -> bytes:
    """A one-dimensional array parameter of `kind` (``text[]``, ...), its
    elements already in binary form (None for NULL)."""
    oid = _ELEMENT[kind]
    n = len(values)
    if not n:
        return struct.pack("!iiI", 0, 0, oid)
    if None not in values:  # every length and value, interleaved at C speed
        body = b"".join(chain.from_iterable(zip(map(_LENGTH, map(len, values)), values, strict=True)))  # type: ignore[arg-type]
        return _HEADER(1, 0, oid, n, 1) + body
    if values.count(None) == n:
        return _HEADER(1, 1, oid, n, 1) + _NULL * n
    parts = [_HEADER(1, 1, oid, n, 1)]
    for v in values:
        parts.append(_NULL if v is None else _LENGTH(len(v)) + v)
    return b"".join(parts)


def _or_none(encode: Callable[[Any], bytes], values: Sequence[Any]) -> list[bytes | None]:
    if None not in values:
        return list(map(encode, values))
    return [None if v is None else encode(v) for v in values]


def _to8(v: int) -> bytes:
    return v.to_bytes(8, "big", signed=True)


def _to4(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def text_array(values: Sequence[str | None]) -> bytes:
    return array("text[]", _or_none(str.encode, values))


def int8_array(values: Sequence[int | None]) -> bytes:
    return array("bigint[]", _or_none(_to8, values))


def int4_array(values: Sequence[int | None]) -> bytes:
    return array("integer[]", _or_none(_to4, values))


def as_int(value: bytes | None) -> int | None:
    """A binary bigint, integer or smallint."""
    return None if value is None else int.from_bytes(value, "big", signed=True)


def as_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


# -- the exchange

#: What an exchange waits for between its steps (`Wire.steps`): the socket
#: readable, or (while libpq still has bytes to send) writable or readable.
READ, WRITE = "read", "write"
Wait = str
Steps = Generator[Wait, None, T]


class Wire:
    """The libpq handle of one psycopg connection, driven from Trio or, for
    a caller's own connection (`accept_in`), blocking.

    A pooled connection's wire is used by one task at a time (the pool's),
    never abandoned half-way: the pool runs every exchange shielded from
    cancellation, so the connection is always handed back between
    statements. `prepared` is the set of statement names this connection
    already has (the pool's wire keeps its own; `accept_in` keeps one per
    caller's connection).
    """

    def __init__(self, conn: psycopg.Connection[Any], prepared: set[bytes] | None = None) -> None:
        self.conn = conn
        self._pg = conn.pgconn
        self._prepared: set[bytes] = set() if prepared is None else prepared
        self._queued: list[Statement | None] = []  # None: a Sync
        #: Answers read so far in the exchange under way (a PREPARE's
        #: counts), for `drive_blocking`'s cancel.
        self.answered = 0

    @property
    def broken(self) -> bool:
        return self.conn.closed or self._pg.status != pq.ConnStatus.OK

    def forget_prepared(self) -> None:
        """Forget which statements the server has."""
        self._prepared.clear()

    def know_prepared(self, names: Iterable[bytes]) -> None:
        """Note statements the server has (as the session lists them)."""
        self._prepared.update(names)

    def send(self, statement: Statement, params: Sequence[bytes | None]) -> None:
        """Queue `statement` (prepared on first use) with binary `params`."""
        pg = self._pg
        if not self._queued:
            pg.enter_pipeline_mode()
        formats = [BINARY] * len(params)
        if not statement.prepare:
            pg.send_query_params(statement.sql, params, statement.types, formats, BINARY)
        else:
            if statement.name not in self._prepared:
                pg.send_prepare(statement.name, statement.sql, statement.types)
                self._prepared.add(statement.name)  # (forgotten again if it fails)
                self._queued.append(statement)  # its PREPARE's answer comes first
            pg.send_query_prepared(statement.name, params, formats, BINARY)
        self._queued.append(None)

    def ask_flush(self) -> None:
        """Ask the server to send its answers so far at once (it holds them
        until the pipeline's end otherwise): a statement queued before this
        is answered even while a later one waits for a lock."""
        self._pg.send_flush_request()

    def push(self) -> None:
        """Start sending what was queued, without waiting: the server gets
        on with it while the caller prepares the next statement."""
        self._pg.flush()

    async def exchange(self) -> list[pq.abc.PGresult]:
        """Send what was queued, with a Sync, and read every answer: the
        result of each statement in order. Raises the first statement's
        error (the server skipped the rest and rolled back an implicit
        transaction) once all the answers are in."""
        return await self.drive(self.steps())

    def exchange_blocking(self, *, cancel_after: int = 0) -> list[pq.abc.PGresult]:
        """`exchange`, blocking the calling thread (a caller's connection).
        A KeyboardInterrupt cancels the server's statement only once the
        first `cancel_after` answers are in (see `drive_blocking`)."""
        return self.drive_blocking(self.steps(), cancel_after=cancel_after)

    def steps(self) -> Steps[list[pq.abc.PGresult]]:
        """The exchange as steps, each waiting for the socket (`drive` or
        `drive_blocking` runs them)."""
        pg = self._pg
        queued, self._queued = self._queued, []
        pg.pipeline_sync()
        results: list[pq.abc.PGresult] = []
        failure: pq.abc.PGresult | None = None
        self.answered = 0
        try:
            yield from self._flush()
            for expected in [*queued, "sync"]:
                last = None
                while True:
                    result = yield from self._result()
                    if result is None:
                        break
                    last = result
                    if result.status == pq.ExecStatus.PIPELINE_SYNC:
                        break
                if last is None:
                    raise psycopg.OperationalError("the server ended the pipeline early")
                status = last.status
                if expected == "sync":
                    if status != pq.ExecStatus.PIPELINE_SYNC:
                        raise psycopg.OperationalError(f"expected the end of a pipeline, got {status!r}")
                    break
                self.answered += 1
                if isinstance(expected, Statement) and status != pq.ExecStatus.COMMAND_OK:
                    self._prepared.discard(expected.name)  # a PREPARE that did not go through
                if status == pq.ExecStatus.FATAL_ERROR:
                    failure = failure or last
                elif status != pq.ExecStatus.PIPELINE_ABORTED and expected is None:
                    results.append(last)
            pg.exit_pipeline_mode()
        except BaseException:
            self._prepared.clear()  # the connection is not reused
            raise
        if failure is not None:
            raise _error(failure)
        return results

    def _result(self) -> Steps[pq.abc.PGresult | None]:
        """The next result, once the server has sent it whole (None: the
        current query's results are all in)."""
        pg = self._pg
        while pg.is_busy():
            yield READ
            pg.consume_input()
        return pg.get_result()

    def _flush(self) -> Steps[None]:
        pg = self._pg
        while pg.flush():
            # Read what the server already answered, so that it never
            # waits to send while we wait to write.
            pg.consume_input()
            yield WRITE

    async def drive(self, steps: Steps[T]) -> T:
        """Run `steps` from Trio, waiting on the socket between them."""
        fd = self._pg.socket
        try:
            wait = next(steps)
            while True:
                if wait == READ:
                    await trio.lowlevel.wait_readable(fd)
                else:
                    with trio.move_on_after(0.05):
                        await trio.lowlevel.wait_writable(fd)
                wait = steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            steps.close()

    def drive_blocking(self, steps: Steps[T], *, cancel_after: int = 0) -> T:
        """Run `steps` in the calling thread, blocking on the socket. A
        KeyboardInterrupt cancels the server's statement, as psycopg does,
        and is raised once the exchange has ended (the connection stays
        usable). The cancel waits for the first `cancel_after` answers:
        `accept_in` cancels nothing before its savepoint is in place, since
        a cancelled BEGIN or SAVEPOINT would fail the caller's transaction
        where one inside the savepoint only undoes the accept."""
        fd = self._pg.socket
        interrupted = cancelled = False
        try:
            wait = next(steps)
            while True:
                if interrupted and not cancelled and self.answered >= cancel_after:
                    cancelled = True
                    self.cancel()
                try:
                    _block(fd, wait)
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    interrupted = True
                wait = steps.send(None)
        except StopIteration as done:
            if interrupted:
                raise KeyboardInterrupt from None
            return done.value  # type: ignore[no-any-return]
        except psycopg.Error:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            steps.close()

    def cancel(self) -> None:
        """Ask the server to cancel the statement it runs for this connection."""
        self._pg.get_cancel().cancel()

    async def run(self, statement: Statement, params: Sequence[bytes | None]) -> pq.abc.PGresult:
        """One statement, in a transaction of its own unless one is open."""
        self.send(statement, params)
        (result,) = await self.exchange()
        return result

    async def commit(self, commit: Commit, value: Any) -> None:
        """COMMIT the open transaction, whose answer had it committed is
        `value`; `commit` keeps both, so that the pool can settle a COMMIT
        whose answer is lost."""
        commit.value = value
        commit.committing = True
        await self.run(COMMIT, ())

    # -- COPY (outside the pipeline: libpq runs no COPY in pipeline mode)

    def literal(self, text: str) -> bytes:
        """`text` as a quoted SQL literal for this connection (a simple
        query, which a COPY needs, takes no parameters)."""
        return pq.Escaping(self._pg).escape_literal(text.encode())

    def copy_in(self, sql: bytes) -> None:
        """Send `sql`, a simple query whose last statement is a ``COPY ...
        FROM STDIN``, without waiting (`copy_ready` waits)."""
        self._pg.send_query(sql)
        self._pg.flush()

    async def copy_ready(self) -> list[pq.abc.PGresult]:
        """Wait until the server takes the COPY's data; returns the results
        of the statements before it. Raises a statement's error (the query
        then ended, nothing is left open)."""
        return await self.drive(self._answers(until_copy=True))

    def copy_data(self, data: bytes) -> None:
        """Queue `data` for the COPY in progress and start sending it
        without waiting (libpq buffers what the socket does not take yet)."""
        pg = self._pg
        if pg.put_copy_data(data) != 1:
            raise psycopg.OperationalError(f"COPY data not sent: {_message(pg)}")
        pg.flush()

    async def copy_end(self, error: str | None = None) -> list[pq.abc.PGresult]:
        """End the COPY in progress (`error`: abandon it, so that its
        transaction rolls back) and read the answers of the rest of its
        query: every result, in order. Raises the first error once the query
        has ended."""
        pg = self._pg
        if pg.put_copy_end(None if error is None else error.encode()) != 1:
            raise psycopg.OperationalError(f"COPY not ended: {_message(pg)}")
        return await self.drive(self._answers(until_copy=False))

    def _answers(self, *, until_copy: bool) -> Steps[list[pq.abc.PGresult]]:
        """Read a simple query's answers to its end, or (`until_copy`) until
        the server takes its COPY's data: every result but the errors, in
        order. Raises the first error once the query has ended."""
        yield from self._flush()
        results: list[pq.abc.PGresult] = []
        failure: pq.abc.PGresult | None = None
        while True:
            result = yield from self._result()
            if result is None:
                break
            if until_copy and result.status == pq.ExecStatus.COPY_IN:
                return results
            if result.status == pq.ExecStatus.FATAL_ERROR:
                failure = failure or result
            else:
                results.append(result)
        if failure is not None:
            raise _error(failure)
        if until_copy:
            raise psycopg.OperationalError("the query ended without starting its COPY")
        return results


def _message(pg: pq.abc.PGconn) -> str:
    return pg.error_message.decode(errors="replace").strip()


def _error(result: pq.abc.PGresult) -> psycopg.Error:
    return psycopg.errors.error_from_result(result, encoding="utf-8")


def _block(fd: int, wait: Wait) -> None:
    """Wait for `fd` readable (READ), or writable or readable (WRITE)."""
    if _poll is None:  # (no poll(2): Windows)
        select.select([fd], [fd] if wait == WRITE else [], [])
        return
    poller = _poll()
    poller.register(fd, select.POLLIN | select.POLLOUT if wait == WRITE else select.POLLIN)
    poller.poll()


_poll = getattr(select, "poll", None)


def rows(result: pq.abc.PGresult) -> list[list[bytes | None]]:
    """A result's values, row by row, as the server sent them."""
    get = result.get_value
    width = range(result.nfields)
    return [[get(r, c) for c in width] for r in range(result.ntuples)]


BEGIN = Statement.of("BEGIN", (), prepare=False)
COMMIT = Statement.of("COMMIT", (), prepare=False)
ROLLBACK = Statement.of("ROLLBACK", (), prepare=False)
