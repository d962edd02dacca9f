"""`accept_in`: accepting inside the application's own transaction (SPEC section 12).

The row commits with the application's own writes or not at all. Nothing
but the transaction is new here: `prepare_row` validates and fingerprints
as for `Outbox.accept`, and each back end's own insert applies the
idempotency table inside a savepoint of the caller's transaction
(`_store._sqlite._accept_in`, `_store._postgres._accept_in`). A conflict,
which `accept` answers, is raised here, as `AcceptConflict`: the caller's
transaction is left as it was, and the caller decides whether it commits.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import TYPE_CHECKING, Any

from ._clock import wall_clock_ms
from ._errors import AcceptConflict, InvalidRequest
from ._model import AcceptOutcome, SendRequest
from ._store._sqlite import _accept_in as _sqlite
from ._validate import prepare_row

if TYPE_CHECKING:
    import psycopg


def accept_in(
    connection: sqlite3.Connection | psycopg.Connection[Any], request: SendRequest
) -> AcceptOutcome:
    """Accept `request` inside the caller's open transaction on `connection`.

    The row exists for workers when the caller commits, and never if the
    caller rolls back: the application's own writes and the message commit
    together or not at all. Validation, fingerprint and the idempotency
    table are those of `Outbox.accept`, with the default limits
    (``max_payload`` 1 MiB, ``max_message_bytes`` 65,536). The work is done
    inside a savepoint, so a request refused here leaves the transaction as
    it was and usable. `accept_in` never commits and never rolls back the
    caller's transaction.

    A plain, blocking function: call it where the application runs its
    other statements on that connection (from Trio, in a thread with
    `trio.to_thread.run_sync`). PostgreSQL workers are woken when the
    caller commits (``NOTIFY`` is transactional); SQLite workers notice the
    commit by themselves within milliseconds (see :doc:`/how-to/accept-in`).
    The outbox's schema must exist: open the outbox once with
    `open_outbox`.

    Args:
        connection: an open `sqlite3.Connection` to the outbox's database
            file (which may hold the application's tables too), or a
            psycopg 3 ``Connection`` to the PostgreSQL outbox's database.
            A transaction open on it is joined; where none is open, the one
            the driver opens implicitly for a write is (sqlite3 with an
            `isolation_level`, or ``autocommit=False``; psycopg with
            autocommit off).
        request: what to send, as for `Outbox.accept`.

    Returns:
        An accepted outcome, as `Outbox.accept` answers it (``accepted_pending``,
        with ``inserted`` set if this call wrote the row; ``accepted_inflight``;
        ``accepted_done``). A conflict is raised instead.

    Raises:
        InvalidRequest: the request is malformed (nothing was written), or
            the connection has no transaction to join: autocommit mode with
            no transaction open, a failed transaction, a closed connection,
            or not a sqlite3 or psycopg 3 connection.
        AcceptConflict: the client_message_id is taken by a different
            request, or by a dead or aborted row; `AcceptConflict.outcome`
            is the ``conflict`` `accept` would answer. Nothing was written.
        SchemaError: the database has no outbox, or an older schema.
        StoreError: the database failed. The savepoint was rolled back;
            if the database rolled back the whole transaction itself (a full
            disk, say), the message says so.
    """
    row = prepare_row(request, now=wall_clock_ms())
    if isinstance(connection, sqlite3.Connection):
        outcome = _sqlite.accept_row(connection, row)
    elif _is_psycopg(connection):
        from ._store._postgres import _accept_in as _postgres  # psycopg is loaded: the caller uses it

        outcome = _postgres.accept_row(connection, row)
    else:
        raise InvalidRequest(
            "accept_in takes a sqlite3.Connection or a psycopg (3) Connection,"
            f" got {type(connection).__module__}.{type(connection).__qualname__}"
        )
    if not outcome.accepted:
        raise AcceptConflict(outcome)
    return outcome


def _is_psycopg(connection: object) -> bool:
    """Whether `connection` is a psycopg 3 connection (psycopg is not
    imported for it: a program holding one has imported it already)."""
    if "psycopg" not in sys.modules:
        return False
    import psycopg

    if isinstance(connection, psycopg.AsyncConnection):
        raise InvalidRequest(
            "accept_in is synchronous and takes a psycopg.Connection, not an AsyncConnection"
            " (psycopg's async API does not run on Trio)"
        )
    return isinstance(connection, psycopg.Connection)
