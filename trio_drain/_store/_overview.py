"""What an operator's view reads of an outbox: counts per status, the oldest
pending row's age, the paused routes, rows per route and the newest dead
rows, written once for both SQL back ends.

The reads come in parts of very different cost, so that a live view can
run the cheap ones every second and the costly ones less often (see
`_metrics._sampler`):

- the head: the oldest pending row's age (one step down the status index),
  the paused routes (a small table) and the newest dead rows (a few steps
  down the status index). Microseconds, whatever the outbox holds.
- the counts per status: a walk of the status index, about 50 ns a row on
  SQLite (50 ms for a million rows).
- rows per route: the waiting, inflight and dead rows grouped by route,
  which reads each of those rows (about 1 µs a row on SQLite).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._model import Status
from ._sql import Dialect

#: A route as the paused-routes table names it (``mesh:<slug>``,
#: ``session:<pubkey>``); rows with neither have none (NULL).
ROUTE_SQL = (
    "CASE WHEN sender_session_pubkey IS NOT NULL THEN 'session:' || sender_session_pubkey"
    " WHEN mesh IS NOT NULL THEN 'mesh:' || mesh END"
)

#: What a row with neither a session nor a mesh is listed under.
NO_ROUTE = "(no mesh)"


@attrs.frozen(kw_only=True)
class RouteRows:
    """The rows of one route that are not delivered yet, or dead.

    Attributes:
        route: ``mesh:<slug>``, ``session:<pubkey>``, or ``(no mesh)`` for
            rows with neither (they go through the only mesh broker).
        pending: rows waiting to be sent (due or not).
        inflight: rows claimed by a worker, sent or about to be.
        dead: rows that will not be sent again unless requeued.
    """

    route: str
    pending: int = 0
    inflight: int = 0
    dead: int = 0


@attrs.frozen(kw_only=True)
class DeadRow:
    """A dead row as an operator's view lists it (its text is untrusted:
    show it through `_display.visible`).

    Attributes:
        id: the row id.
        client_message_id: the caller's id for it.
        route: as in `RouteRows.route`.
        last_error: why it died.
        enqueued_at: when it was accepted (ms since the epoch).
        attempts: sends it had.
    """

    id: str
    client_message_id: str
    route: str
    last_error: str | None
    enqueued_at: int
    attempts: int


@attrs.frozen(kw_only=True)
class Overview:
    """What `Outbox.overview` read. A part not asked for is None.

    Attributes:
        counts: rows per status, all five status names present.
        oldest_pending_age: seconds since the oldest pending row was
            accepted, by the clock that judges due times (the database
            server's on PostgreSQL); None with no pending row.
        paused: the paused routes, as `Outbox.paused` names them.
        routes: rows per route, most pending first.
        newest_dead: the most recently accepted dead rows, newest first.
    """

    counts: Mapping[str, int] | None = None
    oldest_pending_age: float | None = None
    paused: frozenset[str] = frozenset()
    routes: tuple[RouteRows, ...] | None = None
    newest_dead: tuple[DeadRow, ...] = ()


def head(conn: Any, dialect: Dialect, *, now_sql: str, now_args: list[Any], dead_rows: int) -> Overview:
    """The cheap part: the oldest pending row's age, the paused routes, and
    the newest `dead_rows` dead rows. Each is a few steps down an index."""
    mark = dialect.mark
    found = conn.execute(
        # min() over (status, enqueued_at) is one step down the index; the
        # subtraction stays outside it so the planner sees a plain min().
        f"SELECT {now_sql} - (SELECT min(enqueued_at) FROM outbox WHERE status = 'pending')",
        now_args,
    ).fetchone()
    age_ms = None if found is None or found[0] is None else max(int(found[0]), 0)
    paused = frozenset(route for (route,) in conn.execute("SELECT route FROM trio_drain_paused"))
    dead: tuple[DeadRow, ...] = ()
    if dead_rows > 0:
        dead = tuple(
            DeadRow(
                id=row_id,
                client_message_id=cid,
                route=route or NO_ROUTE,
                last_error=error,
                enqueued_at=int(enqueued_at),
                attempts=int(attempts),
            )
            for row_id, cid, route, error, enqueued_at, attempts in conn.execute(
                f"SELECT id, client_message_id, {ROUTE_SQL}, last_error, enqueued_at, attempts"
                f" FROM outbox WHERE status = 'dead' ORDER BY enqueued_at DESC, id DESC LIMIT {mark}",
                (dead_rows,),
            )
        )
    return Overview(
        oldest_pending_age=None if age_ms is None else age_ms / 1000, paused=paused, newest_dead=dead
    )


def status_counts(conn: Any) -> dict[str, int]:
    """Rows per status (all five present): a walk of the status index."""
    counts = dict.fromkeys((s.value for s in Status), 0)
    for status, n in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
        counts[status] = int(n)
    return counts


def route_rows(conn: Any) -> tuple[RouteRows, ...]:
    """Pending, inflight and dead rows per route, most pending first."""
    per: dict[str, dict[str, int]] = {}
    for route, status, n in conn.execute(
        f"SELECT {ROUTE_SQL}, status, count(*) FROM outbox"
        " WHERE status IN ('pending', 'inflight', 'dead') GROUP BY 1, 2"
    ):
        per.setdefault(route or NO_ROUTE, {})[status] = int(n)
    rows = [RouteRows(route=route, **counts) for route, counts in per.items()]
    rows.sort(key=lambda r: (-r.pending, -r.inflight, -r.dead, r.route))
    return tuple(rows)


async def read_overview(backend: object, *, now: int, counts: bool, routes: bool, dead_rows: int) -> Overview:
    """Read an `Overview` of the outbox behind `backend`, in one trip to the
    database (one thread hop; on PostgreSQL one transaction).

    Args:
        backend: the outbox's back end (a `SqlOperations`).
        now: the caller's clock (ms); PostgreSQL ages rows by the server's.
        counts: whether to count rows per status.
        routes: whether to count rows per route.
        dead_rows: how many of the newest dead rows to list.

    Returns:
        The head, and the parts asked for.
    """
    from ._operations import SqlOperations

    if not isinstance(backend, SqlOperations):
        raise TypeError(f"no overview of a {type(backend).__name__}")
    dialect = backend.dialect
    if dialect.server_now is None:
        now_sql, now_args = dialect.mark, [now]
    else:
        # Tests stand a fake clock in for the server's (`PostgresBackend._sql`).
        now_sql, now_args = getattr(backend, "_sql", str)(dialect.server_now), []

    def op(conn: Any) -> Overview:
        found = head(conn, dialect, now_sql=now_sql, now_args=now_args, dead_rows=dead_rows)
        return attrs.evolve(
            found,
            counts=status_counts(conn) if counts else None,
            routes=route_rows(conn) if routes else None,
        )

    return await backend._read(op)
