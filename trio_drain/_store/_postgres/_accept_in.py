"""`accept_in` on PostgreSQL: the caller's psycopg connection, its transaction joined.

The write is `accept`'s own (`NewRows`: the lanes' locks, the insert with
its NOTIFY, which reaches the workers when the caller commits, and the
lanes' settling) inside a savepoint of the caller's transaction. It is
sent the way the store sends its own: one pipeline of named prepared
statements with binary values, through the connection's libpq handle,
here blocking like the caller's driver (`Wire.exchange_blocking`, under
the connection's lock). So an accept is one round trip, savepoint and
release included, where four statements one after the other took four
(two when the request's id is taken: the second reads the row that holds
it). A transaction psycopg has not begun yet (autocommit off, nothing run
since the last commit) is begun in the same round trip, as psycopg would
begin it (its isolation level, read-only and deferrable settings).

The statements are prepared on the caller's connection the first time, and
known prepared from then on (`_PREPARED`, per connection). Something else
may drop them: psycopg deallocates every prepared statement at a rollback
once it has prepared statements of its own (after five runs of a query,
by default), and so does ``DISCARD ALL``; a pooler may hand the session to
another server connection, which may hold them although this process
never prepared them there. The server then answers that a statement does
not exist (or exists already), and the accept rolls back to its savepoint,
reads which of them the session has (``pg_prepared_statements``) and is
sent once more, preparing the others.

A connection in autocommit mode with no transaction open is refused, and
so is a failed transaction. A connection in psycopg's pipeline mode goes
through psycopg's own API instead (`insert_rows`, statement by statement).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.errors
from psycopg import IsolationLevel
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.rows import tuple_row

from ..._errors import InvalidRequest, SchemaError, StoreError
from ..._model import AcceptOutcome, NewRow
from .._lanes import ISOLATION_REFUSED
from . import _wire as wire
from ._pipelines import NewRows
from ._pool import describe, translate
from ._statements import insert_rows

SAVEPOINT = "SAVEPOINT trio_drain_accept"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT trio_drain_accept"
RELEASE = "RELEASE SAVEPOINT trio_drain_accept"

_SAVEPOINT = wire.Statement.of(SAVEPOINT, (), prepare=False)
_ROLLBACK_TO = wire.Statement.of(ROLLBACK_TO, (), prepare=False)
_RELEASE = wire.Statement.of(RELEASE, (), prepare=False)

#: Statements outside the savepoint are never cancelled (a cancel there
#: would fail the caller's transaction); none of them waits for a lock, so
#: a Ctrl-C is raised once they are answered.
NEVER = 1 << 30

MIGRATE = "open it once with trio_drain.open_outbox, which creates or migrates the schema"

#: The statement names prepared on each caller's connection.
_PREPARED: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[bytes]] = weakref.WeakKeyDictionary()

# What the server answers when a prepared statement is not there, or is
# there already although it was not known here.
_PREPARED_ELSEWHERE = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)
_OURS_PREPARED = wire.Statement.of(
    "SELECT name FROM pg_prepared_statements WHERE starts_with(name, 'trio_drain_')", (), prepare=False
)


def accept_row(conn: psycopg.Connection[Any], row: NewRow) -> AcceptOutcome:
    """Insert `row` as `accept` does, in the caller's transaction on `conn`.
    A conflict comes back as its outcome, with nothing left behind."""
    join(conn)
    if conn.pgconn.pipeline_status != PipelineStatus.OFF:
        return _accept_row_statement_by_statement(conn, row)
    with conn.lock:
        try:
            return _accept_row(conn, row)
        except psycopg.Error as exc:
            raise _error(conn, exc) from exc


def _accept_row(conn: psycopg.Connection[Any], row: NewRow) -> AcceptOutcome:
    w = wire.Wire(conn, _PREPARED.setdefault(conn, set()))
    write = NewRows.of([row])
    if write.all_in(_exchange(w, write.send)):
        (outcome,) = write.outcomes()
        return outcome
    # Its id is taken: read the row that holds it.
    (read,) = _exchange(w, write.send_read)
    (outcome,) = write.outcomes(read)
    return outcome


def _exchange(w: wire.Wire, send: Callable[[wire.Wire], None]) -> list[Any]:
    """The statements `send` queues, in a savepoint of their own, as one
    round trip (beginning the caller's transaction first where psycopg has
    not yet): their results. On an error, rolls back to the savepoint; if
    the error was a prepared statement missing (or there unexpectedly),
    learns which ones the session has and sends them once more."""
    for last_try in (False, True):
        begin = w.conn.pgconn.transaction_status == TransactionStatus.IDLE
        if begin:
            conn = w.conn
            w.send(_begin(conn.isolation_level, conn.read_only, conn.deferrable), ())
        w.send(_SAVEPOINT, ())
        w.ask_flush()  # its answer comes back at once, for a Ctrl-C to wait for
        send(w)
        w.send(_RELEASE, ())
        try:
            # A Ctrl-C cancels nothing before the savepoint is in place.
            results = w.exchange_blocking(cancel_after=1 + begin)
        except _PREPARED_ELSEWHERE:
            _undo(w)
            if last_try:
                raise
            w.send(_OURS_PREPARED, ())
            (found,) = w.exchange_blocking(cancel_after=NEVER)
            w.forget_prepared()
            w.know_prepared(name for (name,) in wire.rows(found) if name is not None)
            continue
        except BaseException:
            _undo(w)
            raise
        return results[1 + begin : -1]
    raise AssertionError("unreachable: the last try returns or raises")


@functools.lru_cache(maxsize=16)
def _begin(
    isolation_level: IsolationLevel | None, read_only: bool | None, deferrable: bool | None
) -> wire.Statement:
    """BEGIN as psycopg would send it for a connection with these settings."""
    parts = ["BEGIN"]
    if isolation_level is not None:
        parts.append("ISOLATION LEVEL " + IsolationLevel(isolation_level).name.replace("_", " "))
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return wire.Statement.of(" ".join(parts), (), prepare=False)


def _undo(w: wire.Wire) -> None:
    """Roll back to the savepoint and drop it (one round trip), which also
    brings a transaction that failed inside it back into use."""
    if w.conn.pgconn.transaction_status not in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        return
    try:
        w.send(_ROLLBACK_TO, ())
        w.send(_RELEASE, ())
        w.exchange_blocking(cancel_after=NEVER)
    except psycopg.Error:
        pass  # the error being raised says more


def _accept_row_statement_by_statement(conn: psycopg.Connection[Any], row: NewRow) -> AcceptOutcome:
    """`accept_row` through psycopg's API, for a connection in pipeline mode."""
    # The caller's row factory (dict_row, say) would change what the shared
    # insert reads back.
    factory = conn.row_factory
    conn.row_factory = tuple_row
    try:
        try:
            conn.execute(SAVEPOINT)
            (outcome,) = insert_rows(conn, [row])
        except BaseException as exc:
            undo(conn)
            if isinstance(exc, psycopg.Error):
                raise _error(conn, exc) from exc
            raise
        if outcome.accepted:
            conn.execute(RELEASE)
        else:  # nothing was inserted; not even the NOTIFY is left
            undo(conn)
        return outcome
    except psycopg.Error as exc:  # the RELEASE itself
        raise translate(exc, describe(conn.info.dsn)) from exc
    finally:
        conn.row_factory = factory


def join(conn: psycopg.Connection[Any]) -> None:
    """Refuse a connection with no transaction to join."""
    if conn.closed:
        raise InvalidRequest("accept_in was given a closed psycopg connection")
    status = conn.info.transaction_status
    if status == TransactionStatus.INERROR:
        raise InvalidRequest(
            "the caller's transaction has failed (an earlier statement raised an error):"
            " roll it back before accept_in"
        )
    if status == TransactionStatus.IDLE and conn.autocommit:
        raise InvalidRequest(
            "accept_in joins the caller's transaction, and this psycopg connection is in"
            " autocommit mode with no transaction open: run it inside `with conn.transaction():`,"
            " or use Outbox.accept for a row on its own"
        )
    if status == TransactionStatus.ACTIVE and conn.pgconn.pipeline_status == PipelineStatus.OFF:
        raise InvalidRequest(
            "the caller's psycopg connection is busy with another statement (a COPY in progress,"
            " say): finish it before accept_in"
        )


def undo(conn: psycopg.Connection[Any]) -> None:
    """Roll back to the savepoint and drop it, through psycopg's API."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        try:
            conn.execute(ROLLBACK_TO)
            conn.execute(RELEASE)
        except psycopg.Error:
            pass  # the error being raised says more


def _error(conn: psycopg.Connection[Any], exc: psycopg.Error) -> InvalidRequest | StoreError:
    if isinstance(exc, psycopg.errors.InvalidTextRepresentation) and ISOLATION_REFUSED in str(exc):
        level = (
            str(exc).partition(ISOLATION_REFUSED + ", not ")[2].strip('"').split('"')[0] or "another level"
        )
        return InvalidRequest(
            "a row with an ordering_key needs the caller's transaction at READ COMMITTED (PostgreSQL's"
            f" default), not {level}: its lane's order rests on each statement seeing what committed"
            " before the lane's lock was granted"
        )
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return SchemaError(f"this database has no outbox table: {MIGRATE}")
    if isinstance(exc, psycopg.errors.UndefinedColumn):
        return SchemaError(f"the outbox table is of an older schema: {MIGRATE}")
    return translate(exc, describe(conn.info.dsn))
