"""`accept_in` on PostgreSQL: the caller's psycopg connection, its transaction joined.

The write is `insert_rows`, `accept`'s own (its NOTIFY reaches the workers
when the caller commits), inside a savepoint of the caller's transaction:
one open on the connection, or the one psycopg opens before the first
statement when autocommit is off. A connection in autocommit mode with no
transaction open is refused, and so is a failed transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from ..._errors import InvalidRequest, SchemaError, StoreError
from ..._model import AcceptOutcome, NewRow
from ._pool import describe, translate
from ._statements import insert_rows

SAVEPOINT = "SAVEPOINT trio_drain_accept"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT trio_drain_accept"
RELEASE = "RELEASE SAVEPOINT trio_drain_accept"

MIGRATE = "open it once with trio_drain.open_outbox, which creates or migrates the schema"


def accept_row(conn: psycopg.Connection[Any], row: NewRow) -> AcceptOutcome:
    """Insert `row` as `accept` does, in the caller's transaction on `conn`.
    A conflict comes back as its outcome, with nothing left behind."""
    join(conn)
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


def undo(conn: psycopg.Connection[Any]) -> None:
    """Roll back to the savepoint and drop it, which also brings a
    transaction that failed inside it back into use."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        try:
            conn.execute(ROLLBACK_TO)
            conn.execute(RELEASE)
        except psycopg.Error:
            pass  # the error being raised says more


def _error(conn: psycopg.Connection[Any], exc: psycopg.Error) -> StoreError:
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return SchemaError(f"this database has no outbox table: {MIGRATE}")
    if isinstance(exc, psycopg.errors.UndefinedColumn):
        return SchemaError(f"the outbox table is of an older schema: {MIGRATE}")
    return translate(exc, describe(conn.info.dsn))
