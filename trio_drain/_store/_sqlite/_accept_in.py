"""`accept_in` on SQLite: the caller's sqlite3 connection, its transaction joined.

The write is `Insert`, `accept`'s own, inside a savepoint of the caller's
transaction. Which transaction is joined: one open on the connection;
else the one sqlite3 itself begins before a write (its legacy mode with an
`isolation_level`, the default, or ``autocommit=False`` on Python 3.12+),
begun here the same way; none in autocommit mode (``isolation_level=None``
or ``autocommit=True``) with no transaction open, which is refused.
"""

from __future__ import annotations

import sqlite3

from ..._errors import InvalidRequest, SchemaError, StoreError
from ..._model import AcceptOutcome, NewRow
from .._base import NEW_COLUMNS
from ._errors import translate
from ._statements import Insert

SAVEPOINT = "SAVEPOINT trio_drain_accept"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT trio_drain_accept"
RELEASE = "RELEASE SAVEPOINT trio_drain_accept"

#: Python 3.12's sqlite3.LEGACY_TRANSACTION_CONTROL, the default `autocommit`.
_LEGACY = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", -1)

MIGRATE = "open it once with trio_drain.open_outbox, which creates or migrates the schema"

_AUTOCOMMIT = (
    "accept_in joins the caller's transaction, and this sqlite3 connection is in autocommit"
    " mode ({mode}) with no transaction open: execute BEGIN (BEGIN IMMEDIATE is best) first,"
    " or use Outbox.accept for a row on its own"
)


def accept_row(conn: sqlite3.Connection, row: NewRow) -> AcceptOutcome:
    """Insert `row` as `accept` does, in the caller's transaction on `conn`.
    A conflict comes back as its outcome, with nothing left behind."""
    join(conn)
    # The caller's factories would change what the shared insert reads back.
    factories = conn.row_factory, conn.text_factory
    conn.row_factory, conn.text_factory = None, str
    try:
        try:
            conn.execute(SAVEPOINT)
            (outcome,) = Insert([row])(conn)
        except BaseException as exc:
            undo(conn)
            if isinstance(exc, sqlite3.Error):
                raise _error(conn, exc) from exc
            raise
        if outcome.accepted:
            conn.execute(RELEASE)
        else:  # nothing was inserted; the lanes' settling, if any, goes too
            undo(conn)
        return outcome
    except sqlite3.Error as exc:  # the RELEASE itself
        raise translate(exc) from exc
    finally:
        conn.row_factory, conn.text_factory = factories


def join(conn: sqlite3.Connection) -> None:
    """Make sure a transaction of the caller's is open on `conn`: begin the
    one sqlite3 itself would begin before a write; refuse autocommit."""
    try:
        if conn.in_transaction:
            return
    except sqlite3.ProgrammingError as exc:  # closed, or another thread's
        raise InvalidRequest(f"accept_in cannot use this sqlite3 connection: {exc}") from None
    autocommit = getattr(conn, "autocommit", _LEGACY)  # the attribute is Python 3.12+
    if autocommit is True:
        raise InvalidRequest(_AUTOCOMMIT.format(mode="autocommit=True"))
    level = conn.isolation_level
    if autocommit == _LEGACY and level is None:
        raise InvalidRequest(_AUTOCOMMIT.format(mode="isolation_level=None"))
    # What sqlite3 issues before an INSERT of the caller's: the caller
    # commits it, with conn.commit() or `with conn:`, as any other write.
    try:
        conn.execute(f"BEGIN {level or ''}")
    except sqlite3.Error as exc:
        raise translate(exc) from exc


def undo(conn: sqlite3.Connection) -> None:
    """Roll back to the savepoint and drop it, if the transaction is still
    there (SQLite rolls a whole transaction back on some errors)."""
    if conn.in_transaction:
        try:
            conn.execute(ROLLBACK_TO)
            conn.execute(RELEASE)
        except sqlite3.Error:
            pass  # the error being raised says more


def _error(conn: sqlite3.Connection, exc: sqlite3.Error) -> StoreError:
    error: StoreError
    missing = _missing_columns(conn)
    if missing is None:
        error = SchemaError(f"this database has no outbox table: {MIGRATE}")
    elif missing:
        error = SchemaError(f"the outbox table lacks {', '.join(missing)}: {MIGRATE}")
    else:
        error = translate(exc)
        if not conn.in_transaction:
            error = type(error)(f"{error} (the database rolled back the whole transaction)")
    error.__cause__ = exc
    return error


def _missing_columns(conn: sqlite3.Connection) -> list[str] | None:
    """The columns a new row sets that the outbox table lacks; None if there
    is no outbox table."""
    try:
        present = {r[1] for r in conn.execute("PRAGMA table_xinfo(outbox)")}
    except sqlite3.Error:
        return []
    if not present:
        return None
    return [c for c in NEW_COLUMNS if c not in present]
