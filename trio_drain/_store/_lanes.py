"""Ordering lanes as the stores keep them: which row of a lane may go next.

`_lifecycle.FirstInLane` says a row may be claimed only while no earlier row
of its lane is pending or inflight. Judging that at claim time means a scan
of the lane (a claim's cost would grow with the lane's depth: 0.34 ms for a
claim of 32 behind a lane of 1,000 rows, 41 ms behind 100,000, against a
flat 0.017 ms for a flag, measured on SQLite), so the stores keep the answer
as a flag instead: a row joins its lane with ``lane_blocked = 1``, and the
flag is cleared for the lane's first pending or inflight row, never for two.

Two facts make that cheap to keep:

- A row joins its lane at the end: it is enqueued after every row of its
  lane (`after_last`), so the order of a lane's rows never changes once
  they are in, and the lane's unblocked row is always its first row still
  to go.
- A row that leaves pending and inflight while unblocked left as the
  lane's head, so nothing before it is still to go. The flag of a row that
  left while blocked (dropped, or too old) stays set, which tells the two
  apart later.

So a lane is settled from a row's neighbours in the lane index
(``outbox_lane``: every row of a lane, in order, whatever its status):

- when a row leaves as head, `release_next` clears the flag of the first row
  after it still to go, unless a row before that one holds the lane (a head
  aborted in flight, its lease running: its own release comes when the
  lease runs out);
- when rows join a lane, `settle_joined` clears the flag of the first of
  them if the nearest earlier row that is still to go or left as head is
  neither still to go nor holding its lane (a head aborted in flight holds
  it until its lease runs out; `_lifecycle.holds_lane`): the lane was free.

Neither statement writes to the lane index (its columns never change), so
a claim and an outcome cost no more in a lane than outside one: the index
is written once, when a row joins. Every transaction that adds rows to a
lane or takes a head out of pending and inflight settles those rows' lanes
before it commits, so a lane's next row is released with, never before,
its head's outcome.

On PostgreSQL two transactions settling one lane at once could each see an
empty lane and release two rows: they take the lane's advisory lock first
(`lock`), in key order, before any row lock of theirs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from .._lifecycle import LEAVES_LANE as LEAVES_LANE
from ._sql import Dialect

# Whether a row is still to go, written as "not left": PostgreSQL, before it
# has statistics, would read ``status IN ('pending', 'inflight')`` through
# an index, gather the lane's every later row and sort them, where `<> ALL`
# leaves it walking the lane index to the first match (the plan test in
# tests/test_postgres.py fails on the other spelling).
_TO_GO = "NOT IN ('done', 'dead', 'aborted')"

#: A row's place in its lane: (ordering_key, enqueued_at, id).
Place = tuple[str, int, str]

#: The lane's first row still to go after a place, if the row there (its
#: id bound again) left the lane as its head and no row between holds the
#: lane (a head aborted in flight, its lease running: the walk stops at it,
#: and its flag is clear, so nothing changes); {m}-marked and {pin}-hinted
#: for a dialect (PostgreSQL prepares it once). The place is bound rather
#: than read from the row in the statement: SQLite seeks an index by a row
#: value only when its values are bound, and otherwise walks every row of
#: the lane enqueued in the same millisecond (a batch's rows share one).
RELEASE_NEXT_SQL = (
    "UPDATE outbox SET lane_blocked = 0 WHERE id = (SELECT o.id FROM outbox AS o{pin}"
    " WHERE o.ordering_key = {m} AND (o.enqueued_at, o.id) > ({m}, {m})"
    f" AND (o.status {_TO_GO} OR o.lease_expires_at IS NOT NULL) ORDER BY o.enqueued_at, o.id LIMIT 1)"
    " AND lane_blocked = 1 AND EXISTS (SELECT 1 FROM outbox AS x"
    " WHERE x.id = {m} AND x.lane_blocked = 0 AND x.status IN ('done', 'dead', 'aborted')"
    " AND x.lease_expires_at IS NULL)"
)

#: A row that joined its lane ({row}) goes if nothing holds the lane:
#: walking back from its place ({key}, {at}, {id}) past rows that left
#: while blocked, the first row found left as head and holds nothing more
#: (it is not still to go, nor aborted in flight with its lease still
#: running), or there is none.
SETTLE_JOINED_SQL = (
    "UPDATE outbox SET lane_blocked = 0 WHERE id = {row} AND lane_blocked = 1"
    f" AND NOT coalesce((SELECT p.status {_TO_GO} OR p.lease_expires_at IS NOT NULL"
    " FROM outbox AS p{pin}"
    " WHERE p.ordering_key = {key} AND (p.enqueued_at, p.id) < ({at}, {id})"
    f" AND (p.status {_TO_GO} OR p.lane_blocked = 0)"
    " ORDER BY p.enqueued_at DESC, p.id DESC LIMIT 1), FALSE)"
)

#: SQLite binds the joined row's place (its clock, the caller's, stamped
#: it); PostgreSQL's server stamps the time, so the statement reads the
#: place from the first of a lane's joined rows (bound as an array of ids),
#: which PostgreSQL's planner seeks by as well as by bound values.
SETTLE_JOINED_BOUND = SETTLE_JOINED_SQL.format(
    row="?", key="?", at="?", id="?", pin=" INDEXED BY outbox_lane"
)
SETTLE_JOINED_FIRST_OF = SETTLE_JOINED_SQL.format(
    row="(SELECT x.id FROM outbox AS x WHERE x.id = ANY(%s::text[]) ORDER BY x.enqueued_at, x.id LIMIT 1)",
    key="outbox.ordering_key",
    at="outbox.enqueued_at",
    id="outbox.id",
    pin="",
)

#: The lane's last row (whatever its status): a row joining the lane is
#: enqueued after it.
LAST_IN_LANE_SQL = "SELECT enqueued_at, id FROM outbox{pin} WHERE ordering_key = {m} ORDER BY enqueued_at DESC, id DESC LIMIT 1"

#: PostgreSQL's advisory lock of one lane, for the rest of the transaction:
#: the lane key's 64-bit hash, seeded with a constant of the project's. The
#: locks are taken in key order; two keys whose hashes collide would take
#: one lock in two places of that order, and two transactions could wait on
#: each other (PostgreSQL would break it and one would fail): with 64 bits
#: that needs about 4 billion lanes to be likely (with `hashtext`'s 32 bits,
#: a million lanes held about a hundred colliding pairs).
#:
#: It also refuses a transaction that is not READ COMMITTED (an
#: application's, in `accept_in`): the lanes' statements must each see what
#: committed before the lock was granted, where a snapshot taken at the
#: transaction's first statement could see an empty lane another
#: transaction has just filled and release a second row. The refusal is a
#: failed cast whose text carries `ISOLATION_REFUSED` (the store's own
#: connections are pinned to READ COMMITTED).
LOCK_SQL = (
    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 1953653108)),"
    " CASE WHEN current_setting('transaction_isolation') <> 'read committed'"
    " THEN ('trio-drain: ordering lanes need READ COMMITTED transactions, not '"
    " || current_setting('transaction_isolation'))::integer END"
)
ISOLATION_REFUSED = "ordering lanes need READ COMMITTED transactions"


def release_next_sql(dialect: Dialect) -> str:
    return RELEASE_NEXT_SQL.format(m=dialect.mark, pin=dialect.pin("outbox_lane"))


def last_in_lane_sql(dialect: Dialect) -> str:
    return LAST_IN_LANE_SQL.format(m=dialect.mark, pin=dialect.pin("outbox_lane"))


def repair(conn: Any, mark: str) -> None:
    """Make a schema 2 outbox's lanes what this module relies on (its
    migration to 3, in the migration's transaction; `mark` the driver's
    placeholder). Schema 2 placed a new row only after its lane's rows still
    to go, and could place it in the same millisecond under a smaller id
    (another process's), before the lane's head; and a row stamped by a
    clock that stepped back could go before a row that had left as head.
    For each lane with rows still to go: rows still to go ahead of an
    inflight row move behind the lane's last row, in their order (they were
    accepted after that head went out); then the first row still to go is
    the lane's one unblocked row, and every row after it is blocked (a row
    there that has left is one that left while blocked)."""
    keys = [
        key
        for (key,) in conn.execute(
            f"SELECT DISTINCT ordering_key FROM outbox WHERE ordering_key IS NOT NULL AND status {_TO_GO}"
        ).fetchall()
    ]
    select = f"SELECT id, enqueued_at, status, lane_blocked FROM outbox WHERE ordering_key = {mark} ORDER BY enqueued_at, id"
    for key in sorted(keys):
        rows = [list(r) for r in conn.execute(select, (key,)).fetchall()]
        inflight = next((i for i, r in enumerate(rows) if r[2] == "inflight"), None)
        if inflight is not None:
            ahead = [r for r in rows[:inflight] if r[2] in ("pending", "inflight")]
            last_at = rows[-1][1]
            for n, r in enumerate(ahead, 1):
                conn.execute(f"UPDATE outbox SET enqueued_at = {mark} WHERE id = {mark}", (last_at + n, r[0]))
                r[1] = last_at + n
            rows = [r for r in rows if r not in ahead] + ahead
        head = next(i for i, r in enumerate(rows) if r[2] in ("pending", "inflight"))
        for i, r in enumerate(rows[head:], head):
            blocked = 0 if i == head else 1
            if r[3] != blocked:
                conn.execute(f"UPDATE outbox SET lane_blocked = {mark} WHERE id = {mark}", (blocked, r[0]))


def lane_keys(keys: Iterable[str | None]) -> list[str]:
    """The distinct lane keys among `keys`, in the order locks are taken."""
    return sorted({k for k in keys if k is not None})


def places(found: Iterable[Sequence[Any]]) -> list[Place]:
    """The places of the lane rows among `found`, rows read as (id,
    ordering_key, enqueued_at)."""
    return [(key, at, row_id) for row_id, key, at in found if key is not None]


def release_next(conn: Any, dialect: Dialect, left: Iterable[Place]) -> None:
    """Let the next row of each lane go whose head was at one of the places
    `left` and has left it (any other row is left be: the statement checks)."""
    params = [(key, at, row_id, row_id) for key, at, row_id in left]
    if params:
        conn.cursor().executemany(release_next_sql(dialect), params)


def settle_joined(conn: sqlite3.Connection, joined: Iterable[Place]) -> None:
    """SQLite: let each row at a place `joined`, rows that just joined their
    lanes, go if its lane has nothing earlier still to go. Pass a lane's
    joined rows in order (the first one that went in is the one that may go)."""
    params = [(row_id, key, at, row_id) for key, at, row_id in joined]
    if params:
        conn.executemany(SETTLE_JOINED_BOUND, params)


def after_last(enqueued_at: int, row_id: str, last: tuple[int, str] | None) -> int:
    """When a row with `row_id`, stamped `enqueued_at`, is enqueued so that it
    comes after `last` (its lane's last row, as enqueue time and id):
    unchanged when it does, else a millisecond after `last` (a clock that
    stepped back, or two writers in one millisecond, cannot reorder a lane)."""
    if last is None or (enqueued_at, row_id) > last:
        return enqueued_at
    return last[0] + 1


def lock(conn: Any, keys: Sequence[str]) -> None:
    """Take PostgreSQL's advisory locks of `keys` (sorted: no two
    transactions wait on each other's)."""
    for key in keys:
        conn.execute(LOCK_SQL, (key,))
