"""The SQLite back end's statements: claim, complete, and the idempotent insert.

Each is a function of a connection, run by the group committer inside its
transaction; none commits.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from ... import _crashpoints
from ..._idempotency import decide_accept
from ..._lifecycle import (
    CLAIMABLE,
    Completion,
    releases_lane,
)
from ..._model import NewRow, OutboxRow
from .._base import (
    COLUMNS,
    NEW_COLUMNS,
    Applied,
    Outcomes,
    RouteFilter,
    Rows,
    in_claim_order,
    row_from_values,
)
from .._lanes import Place, after_last, last_in_lane_sql, release_next, settle_joined
from .._reads import SELECT
from .._sql import SQLITE


def _insert(columns: tuple[str, ...]) -> str:
    """An INSERT binding `columns`; a row with an ordering key starts
    blocked behind its lane (`_lanes`), which the same transaction settles."""
    lane = columns.index("ordering_key") + 1
    return (
        f"INSERT INTO outbox ({', '.join(columns)}, lane_blocked)"
        f" VALUES ({', '.join('?' * len(columns))}, ?{lane} IS NOT NULL)"
    )


#: A whole row (a requeued row's successor).
INSERT = _insert(COLUMNS)
#: New rows bind only the columns they set (the rest default to NULL).
INSERT_NEW = _insert(NEW_COLUMNS) + " ON CONFLICT (client_message_id) DO NOTHING"


def claim_statement(
    now: int, limit: int, lease_ms: int, max_age_ms: int, token: str, exclude: RouteFilter
) -> tuple[str, list[Any]]:
    claimable, args = SQLITE.where(CLAIMABLE, now=now, max_age_ms=max_age_ms)
    routes, route_args = SQLITE.routes(exclude)
    # INDEXED BY pins the claim index: the planner would otherwise often
    # pick outbox_due and sort the whole backlog.
    sql = (
        "UPDATE outbox SET status = 'inflight', attempts = attempts + 1,"
        " lease_token = ?, lease_expires_at = ?"
        " WHERE id IN (SELECT id FROM outbox INDEXED BY outbox_claim"
        f"  WHERE {claimable}{routes}"
        "  ORDER BY priority_rank, enqueued_at LIMIT ?)"
        " RETURNING " + ", ".join(COLUMNS) + ", priority_rank"
    )
    return sql, [token, now + lease_ms, *args, *route_args, limit]


def claim_rows(conn: sqlite3.Connection, sql: str, args: list[Any]) -> Rows:
    found = conn.execute(sql, args).fetchall()
    _crashpoints.reached("claim_before_commit")
    return in_claim_order(found)


# The fence (still inflight under the completion's token) is in the WHERE.
COMPLETE_ONE = (
    "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
    " delivered_at = ?, broker_message_id = ?, lease_token = NULL, lease_expires_at = NULL"
    " WHERE id = ? AND status = 'inflight' AND lease_token = ?"
)


# Many at once: the same update joined to a table of completions. SQLite
# allows 32,766 bound values; 8 a row, in chunks well under that.
COMPLETE_CHUNK = 1000


@functools.lru_cache(maxsize=64)  # one string per batch size: SQLite's statement cache hits
def complete_many_sql(n: int) -> str:
    return (
        "WITH c(status, attempts, next_attempt_at, last_error, delivered_at, broker_message_id, id, token)"
        " AS (VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n) + ")"
        " UPDATE outbox SET status = c.status, attempts = c.attempts, next_attempt_at = c.next_attempt_at,"
        " last_error = c.last_error, delivered_at = c.delivered_at, broker_message_id = c.broker_message_id,"
        " lease_token = NULL, lease_expires_at = NULL"
        " FROM c WHERE outbox.id = c.id AND outbox.status = 'inflight' AND outbox.lease_token = c.token"
    )


def complete_rows(conn: sqlite3.Connection, completions: Sequence[Completion]) -> Applied:
    """Apply completions; per completion, whether its row was still inflight
    under its token.

    One statement per chunk. When it changed as many rows as it had
    completions (the usual case) every one applied; otherwise (a stale
    lease, or a row twice) the chunk is undone and applied row by row,
    which says which ones took.
    """
    applied: list[bool] = []
    for start in range(0, len(completions), COMPLETE_CHUNK):
        chunk = completions[start : start + COMPLETE_CHUNK]
        values = [
            (
                c.status.value,
                c.attempts,
                c.next_attempt_at,
                c.last_error,
                c.delivered_at,
                c.broker_message_id,
                c.row_id,
                c.lease_token,
            )
            for c in chunk
        ]
        if len(values) == 1:  # a lone outcome (a lane's head): its statement says if it took
            applied.append(conn.execute(COMPLETE_ONE, values[0]).rowcount == 1)
            _crashpoints.reached("completion_mid_batch")
            continue
        conn.execute("SAVEPOINT complete")
        before = conn.total_changes
        conn.execute(complete_many_sql(len(chunk)), [v for row in values for v in row])
        if conn.total_changes - before == len(chunk):
            applied.extend([True] * len(chunk))
        else:
            conn.execute("ROLLBACK TO complete")
            applied.extend(conn.execute(COMPLETE_ONE, row).rowcount == 1 for row in values)
        _crashpoints.reached("completion_mid_batch")
        conn.execute("RELEASE complete")
    release_next(conn, SQLITE, [place_of(c) for c in completions if releases_lane(c)])
    return applied


class Insert:
    """`accept`'s write: insert new rows, each decided against the row that
    holds its client_message_id."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[NewRow]) -> None:
        self.rows = rows

    def __call__(self, conn: sqlite3.Connection) -> Outcomes:
        # Insert everything, skipping ids already taken; the write lock is
        # held, so nothing slips in between. When every row went in (the
        # common case) there is nothing to look up.
        inserted = Insert.jointly(conn, [self])
        if inserted is not None:
            return inserted[0]
        # Some ids were taken (a retry, or a repeat inside the batch):
        # decide each row against the row that holds its id now, which
        # is its own row if it went in (`jointly` leaves what it inserted;
        # only the committer's joint run rolls it back).
        holders: dict[str, OutboxRow] = {}
        ids = list(dict.fromkeys(r.client_message_id for r in self.rows))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for found in conn.execute(SELECT + f" WHERE client_message_id IN ({marks})", chunk):
                holder = row_from_values(found)
                holders[holder.client_message_id] = holder
        outcomes = []
        for row in self.rows:
            holder = holders[row.client_message_id]
            outcomes.append(
                decide_accept(
                    None if holder.id == row.id else holder,
                    client_message_id=row.client_message_id,
                    fingerprint=row.request_fingerprint,
                    new_row_id=row.id,
                )
            )
        return outcomes

    @staticmethod
    def jointly(conn: sqlite3.Connection, inserts: list[Insert]) -> list[Outcomes] | None:
        """The inserts of concurrent `accept` calls as one statement (group
        commit's writer-side half). Any id already taken, and they go one by
        one instead (None), so that each caller gets its own answer."""
        rows = in_lane_order(conn, [row for insert in inserts for row in insert.rows])
        before = conn.total_changes
        conn.executemany(INSERT_NEW, rows)  # NewRows are the parameters as they stand
        changed = conn.total_changes - before
        if changed != len(rows):
            # Some rows did not go in: any of a lane's may be its first.
            settle_joined(conn, [place for place in map(new_place, rows) if place is not None])
            return None
        settle_joined(conn, firsts_in_lanes(rows))
        return [all_inserted(insert.rows) for insert in inserts]


def place_of(c: Completion) -> Place:
    assert c.ordering_key is not None
    return (c.ordering_key, c.enqueued_at, c.row_id)


def new_place(r: NewRow) -> Place | None:
    return None if r.ordering_key is None else (r.ordering_key, r.enqueued_at, r.id)


def firsts_in_lanes(rows: Sequence[NewRow]) -> list[Place]:
    """Each lane's first row among `rows` (in order): its place."""
    firsts: dict[str, Place] = {}
    for r in rows:
        place = new_place(r)
        if place is not None:
            firsts.setdefault(place[0], place)
    return list(firsts.values())


def in_lane_order(conn: sqlite3.Connection, rows: list[NewRow]) -> list[NewRow]:
    """`rows`, each enqueued after its lane's last row (`_lanes.after_last`),
    so that a lane's order is its accept order even when the clock steps back."""
    if not any(r.ordering_key is not None for r in rows):
        return rows
    last: dict[str, tuple[int, str] | None] = {}
    ordered = []
    for r in rows:
        key = r.ordering_key
        if key is not None:
            if key not in last:
                last[key] = conn.execute(last_in_lane_sql(SQLITE), (key,)).fetchone()
            enqueued_at = after_last(r.enqueued_at, r.id, last[key])
            if enqueued_at != r.enqueued_at:
                r = r._replace(enqueued_at=enqueued_at)
            last[key] = (r.enqueued_at, r.id)
        ordered.append(r)
    return ordered


def all_inserted(rows: Sequence[NewRow]) -> Outcomes:
    return [
        decide_accept(
            None, client_message_id=r.client_message_id, fingerprint=r.request_fingerprint, new_row_id=r.id
        )
        for r in rows
    ]
