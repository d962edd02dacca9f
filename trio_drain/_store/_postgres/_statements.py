"""The PostgreSQL back end's statements: the idempotent insert, the claim, and the
fenced completion, each a function of a connection inside its transaction."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors

from ..._errors import StoreUnavailable
from ..._idempotency import decide_accept
from ..._lifecycle import (
    CLAIMABLE,
    Completion,
    releases_lane,
)
from ..._model import NewRow, OutboxRow
from .._base import (
    COLUMNS,
    Applied,
    Outcomes,
    RouteFilter,
    Rows,
    in_claim_order,
    new_row_values,
    row_from_values,
)
from .._lanes import SETTLE_JOINED_FIRST_OF, Place, lane_keys, lock, release_next
from .._reads import SELECT
from .._sql import POSTGRES, SERVER_NOW
from ._pool import Commit
from ._schema import COLUMN_TYPES

CHANNEL = "trio_drain_outbox"


COLS = ", ".join(COLUMNS)


RETURNING = ", ".join("outbox." + c for c in COLUMNS)


# Columns a new row's insert binds; the two times are the server's.
STAMPED = ("enqueued_at", "next_attempt_at")


BOUND = tuple(c for c in COLUMNS if c not in STAMPED)


BOUND_AT = [COLUMNS.index(c) for c in BOUND]


# One statement inserts a whole batch: a column of values per array.
# A lane's rows are in accept order: a row is enqueued after its lane's last
# row (`_lanes`), a millisecond after it if the server's clock says
# otherwise (it stepped back, or another transaction wrote in the same
# millisecond); the rows of one statement share a time and go by id.
LANE_ENQUEUED_AT = (
    f"GREATEST({SERVER_NOW}, (SELECT o.enqueued_at + 1 FROM outbox o"
    " WHERE o.ordering_key = u.ordering_key ORDER BY o.enqueued_at DESC, o.id DESC LIMIT 1))"
)


# A row with an ordering key starts blocked behind its lane (`_lanes`),
# which the same transaction settles.
INSERT = (
    f"INSERT INTO outbox ({COLS}, lane_blocked) SELECT "
    + ", ".join(
        LANE_ENQUEUED_AT if c == "enqueued_at" else SERVER_NOW if c in STAMPED else f"u.{c}" for c in COLUMNS
    )
    + ", (u.ordering_key IS NOT NULL)::integer"
    + " FROM unnest("
    + ", ".join(f"%s::{COLUMN_TYPES[c]}[]" for c in BOUND)
    + ")"
    + " AS u("
    + ", ".join(BOUND)
    + ")"
    + " ON CONFLICT (client_message_id) DO NOTHING RETURNING client_message_id, enqueued_at"
)


STATUS_AT = BOUND.index("status")


def as_columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows' values (in `COLUMNS` order) as one list per bound column (the
    server stamps the times), Status bound as its text."""
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]
    bound = [columns[at] for at in BOUND_AT]
    bound[STATUS_AT] = [str(s) for s in bound[STATUS_AT]]
    return bound


# A lone row (every `accept_in`, and `accept`) binds its values as they are:
# the server plans and runs the unnest of one-element arrays about four
# times slower (0.56 ms against 0.14 a statement, measured here).
_UNNEST = "unnest(" + ", ".join(f"%s::{COLUMN_TYPES[c]}[]" for c in BOUND) + ")"
_ONE_ROW = "(VALUES (" + ", ".join(f"%s::{COLUMN_TYPES[c]}" for c in BOUND) + "))"


@functools.lru_cache(maxsize=8)
def one_row(insert: str) -> str | None:
    """`insert` (`INSERT`, or its copy under a stand-in clock) for one row
    bound as scalars, or None if it has no unnest to replace."""
    return insert.replace(_UNNEST, _ONE_ROW) if _UNNEST in insert else None


def insert_rows(conn: psycopg.Connection[Any], rows: Sequence[NewRow], insert: str = INSERT) -> Outcomes:
    """`accept`'s write through psycopg's API, statement by statement,
    inside the transaction open on `conn` (`accept_in` on a connection in
    psycopg's pipeline mode; everything else sends `NewRows` on the wire):
    insert new rows, each decided against the row that holds its
    client_message_id, and tell the workers (NOTIFY, delivered when the
    transaction commits). `insert` is `INSERT`, or its copy under a test's
    stand-in for the server's clock."""
    # The first row of each client_message_id is offered for insert; a
    # repeat later in the batch is decided against it, like any other
    # existing row. ON CONFLICT waits for a concurrent insert of the
    # same id to commit or roll back, so exactly one of them wins and
    # the others read the winner's row.
    first_of: dict[str, NewRow] = {}
    for r in rows:
        first_of.setdefault(r.client_message_id, r)
    firsts = list(first_of.values())
    lanes = lane_keys(r.ordering_key for r in firsts)
    lock(conn, lanes)
    columns = as_columns([new_row_values(r) for r in firsts])
    single = one_row(insert) if len(firsts) == 1 else None
    if single is not None:
        found = conn.execute(single, [c[0] for c in columns]).fetchall()
    else:
        found = conn.execute(insert, columns).fetchall()
    inserted = {r[0] for r in found}
    for ids in joined_by_lane(firsts):
        conn.execute(SETTLE_JOINED_FIRST_OF, (ids,))
    existing: dict[str, OutboxRow] = {}
    others = [r.client_message_id for r in firsts if r.client_message_id not in inserted]
    if others:
        for found in conn.execute(SELECT + " WHERE client_message_id = ANY(%s::text[])", (others,)):
            prior = row_from_values(found)
            existing[prior.client_message_id] = prior
        missing = set(others) - set(existing)
        if missing:  # deleted between the conflict and the read (a prune)
            raise StoreUnavailable(f"rows {sorted(missing)[:3]} vanished during accept; retry")
    # None only for the first row of an id this statement inserted.
    outcomes = decide_each(rows, existing)
    if inserted:
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    return outcomes


def decide_each(rows: Sequence[NewRow], existing: dict[str, OutboxRow]) -> Outcomes:
    """Each row's outcome against the row that held its client_message_id
    (`existing`; none: it went in); a repeat later in the batch is decided
    against the row before it."""
    outcomes = []
    for row in rows:
        cid = row.client_message_id
        outcome = decide_accept(
            existing.get(cid), client_message_id=cid, fingerprint=row.request_fingerprint, new_row_id=row.id
        )
        if outcome.inserted:
            existing[cid] = row_from_values(new_row_values(row))
        outcomes.append(outcome)
    return outcomes


def claim_statement(
    limit: int, lease_ms: int, max_age_ms: int, token: str, exclude: RouteFilter
) -> tuple[str, list[Any]]:
    """The claim, due-ness, age and lease all by the server's clock. The
    transaction id comes back between the columns and the rank (the last
    value, which `in_claim_order` sorts by)."""
    claimable, args = POSTGRES.where(CLAIMABLE, max_age_ms=max_age_ms)
    routes, route_args = POSTGRES.routes(exclude)
    sql = (
        f"WITH picked AS (SELECT id FROM outbox WHERE {claimable}{routes}"
        " ORDER BY priority_rank, enqueued_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        " UPDATE outbox SET status = 'inflight', attempts = outbox.attempts + 1,"
        f" lease_token = %s, lease_expires_at = {SERVER_NOW} + %s FROM picked WHERE outbox.id = picked.id"
        f" RETURNING {RETURNING}, txid_current(), outbox.priority_rank"
    )
    return sql, [*args, *route_args, limit, token, lease_ms]


XID_AT = len(COLUMNS)  # where a claimed row's transaction id is


def claim_rows(conn: psycopg.Connection[Any], sql: str, args: list[Any], commit: Commit | None) -> Rows:
    found = conn.execute(sql, args).fetchall()
    if found and commit is not None:
        commit.xid = found[0][XID_AT]
    return in_claim_order(found)


# One statement for the whole batch; the fence is in the join. A pending
# row's retry time is the host's (its now + backoff): it is moved onto the
# server's timeline by the host's offset, `SERVER_NOW - host_now` when the
# caller's now is known (first parameter), else the last offset measured
# (second). A completion that carries its delay (`retry_in_ms`) is simply
# due that long after the server's now.
COMPLETE = (
    "UPDATE outbox SET status = c.status, attempts = c.attempts,"
    " next_attempt_at = CASE"
    f"  WHEN c.retry_in IS NOT NULL THEN {SERVER_NOW} + c.retry_in"
    f"  WHEN c.status = 'pending' THEN c.next_attempt_at + COALESCE({SERVER_NOW} - %s::bigint, %s::bigint)"
    "  ELSE c.next_attempt_at END,"
    " last_error = c.last_error, delivered_at = c.delivered_at, broker_message_id = c.broker_message_id,"
    " lease_token = NULL, lease_expires_at = NULL"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::integer[], %s::bigint[],"
    "  %s::text[], %s::bigint[], %s::text[], %s::bigint[])"
    " AS c(id, token, status, attempts, next_attempt_at, last_error, delivered_at,"
    "  broker_message_id, retry_in)"
    " WHERE outbox.id = c.id AND outbox.status = 'inflight' AND outbox.lease_token = c.token"
    " RETURNING c.id, c.token, txid_current()"
)


def complete_rows(
    conn: psycopg.Connection[Any],
    sql: str,
    completions: Sequence[Completion],
    *,
    host_now: int | None,
    offset: int,
    commit: Commit | None,
) -> Applied:
    """Apply completions (`sql` is `COMPLETE`); `host_now` is the caller's
    clock now, or None to use `offset` (server minus host) instead."""
    # Losing an outcome to a server crash is harmless (the lease brings the
    # row back and the broker dedupes the resend), so these commits do not
    # wait for the WAL flush.
    conn.execute("SET LOCAL synchronous_commit = off")
    lock(conn, completed_lanes(completions))
    retry_in = [c.retry_in_ms for c in completions]
    found = conn.execute(
        sql,
        [
            host_now,
            offset,
            [c.row_id for c in completions],
            [c.lease_token for c in completions],
            [c.status.value for c in completions],
            [c.attempts for c in completions],
            [c.next_attempt_at for c in completions],
            [c.last_error for c in completions],
            [c.delivered_at for c in completions],
            [c.broker_message_id for c in completions],
            retry_in,
        ],
    ).fetchall()
    release_next(conn, POSTGRES, released_rows(completions))
    if found and commit is not None:
        commit.xid = found[0][2]
    applied = {(r[0], r[1]) for r in found}
    return [(c.row_id, c.lease_token) in applied for c in completions]


# Rows a claim took, read back by its lease token, in claim order.
HELD = f"SELECT {COLS}, outbox.priority_rank FROM outbox WHERE status = 'inflight' AND lease_token = %s"


def joined_by_lane(rows: Sequence[NewRow]) -> list[list[str]]:
    """The ids of `rows` that join a lane, a list a lane (in lane-key order)."""
    by_lane: dict[str, list[str]] = {}
    for r in rows:
        if r.ordering_key is not None:
            by_lane.setdefault(r.ordering_key, []).append(r.id)
    return [by_lane[key] for key in sorted(by_lane)]


def released_rows(completions: Sequence[Completion]) -> list[Place]:
    """The places of the rows that `completions` may take out of their lanes' heads."""
    return [
        (c.ordering_key, c.enqueued_at, c.row_id)
        for c in completions
        if c.ordering_key is not None and releases_lane(c)
    ]


def completed_lanes(completions: Sequence[Completion]) -> list[str]:
    """The lanes whose heads `completions` may release (lock them first)."""
    return lane_keys(c.ordering_key for c in completions if releases_lane(c))
