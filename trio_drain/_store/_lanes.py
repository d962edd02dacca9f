"""Ordering lanes as the stores keep them: which row of a lane may go next.

`_lifecycle.FirstInLane` says a row may be claimed only while no earlier row
of its lane is pending or inflight. Judging that at claim time means a scan
of the lane (a claim's cost would grow with the lane's depth: 0.34 ms for a
claim of 32 behind a lane of 1,000 rows, 41 ms behind 100,000, against a
flat 0.017 ms for a flag, measured on SQLite), so the stores keep the answer
as a flag instead: a row is accepted with ``lane_blocked = 1``, and
`settle` clears it for a lane's first pending or inflight row when the lane
has no unblocked one. Every transaction that inserts lane rows or takes a
lane's head out of pending and inflight (done, dead, aborted) settles the
lanes it touched before it commits, so a lane's next row is released with,
never before, its head's outcome.

On PostgreSQL two transactions settling one lane at once could each see no
head and release two rows: they take the lane's advisory lock first
(`lock_sql`), in key order, before any row lock of theirs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .._lifecycle import LEAVES_LANE as LEAVES_LANE
from ._sql import Dialect

#: The lane's first pending or inflight row goes, unless one already may
#: (the text is {m}-marked for each dialect; PostgreSQL prepares it once).
SETTLE_SQL = (
    "UPDATE outbox SET lane_blocked = 0 WHERE id = (SELECT id FROM outbox"
    " WHERE ordering_key = {m} AND status IN ('pending', 'inflight') ORDER BY enqueued_at, id LIMIT 1)"
    " AND lane_blocked = 1 AND NOT EXISTS (SELECT 1 FROM outbox"
    " WHERE ordering_key = {m} AND status IN ('pending', 'inflight') AND lane_blocked = 0)"
)

#: PostgreSQL's advisory lock of one lane, for the rest of the transaction.
#: The first key is a constant that keeps the project's locks apart from
#: anyone else's; the second is the lane key's hash (a collision only makes
#: two lanes take turns).
LOCK_SQL = "SELECT pg_advisory_xact_lock(1953653108, hashtext(%s))"


def lane_keys(keys: Iterable[str | None]) -> list[str]:
    """The distinct lane keys among `keys`, in the order locks are taken."""
    return sorted({k for k in keys if k is not None})


def settle(conn: Any, dialect: Dialect, keys: Sequence[str]) -> None:
    """Let the next row of each lane in `keys` go where its lane has none going."""
    if keys:
        sql = SETTLE_SQL.format(m=dialect.mark)
        conn.cursor().executemany(sql, [(k, k) for k in keys])


def lock(conn: Any, keys: Sequence[str]) -> None:
    """Take PostgreSQL's advisory locks of `keys` (sorted: no two
    transactions wait on each other's)."""
    for key in keys:
        conn.execute(LOCK_SQL, (key,))
