"""The PostgreSQL back end's statements: the idempotent insert, the claim, and the
fenced completion, each a function of a connection inside its transaction."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import attrs
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
    NEW_COLUMNS,
    Applied,
    Outcomes,
    RouteFilter,
    Rows,
    in_claim_order,
    new_row_values,
    row_from_values,
)
from .._lanes import LOCK_SQL, SETTLE_JOINED_FIRST_OF, Place, lane_keys, lock, release_next, release_next_sql
from .._reads import SELECT
from .._sql import POSTGRES, SERVER_NOW
from . import _wire as wire
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
_LANE_ENQUEUED_AT = (
    f"GREATEST({SERVER_NOW}, (SELECT o.enqueued_at + 1 FROM outbox o"
    " WHERE o.ordering_key = u.ordering_key ORDER BY o.enqueued_at DESC, o.id DESC LIMIT 1))"
)


# A row with an ordering key starts blocked behind its lane (`_lanes`),
# which the same transaction settles.
INSERT = (
    f"INSERT INTO outbox ({COLS}, lane_blocked) SELECT "
    + ", ".join(
        _LANE_ENQUEUED_AT if c == "enqueued_at" else SERVER_NOW if c in STAMPED else f"u.{c}" for c in COLUMNS
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
    outcomes = []
    for row in rows:
        cid = row.client_message_id
        # None only for the first row of an id this statement inserted.
        outcome = decide_accept(
            existing.get(cid),
            client_message_id=cid,
            fingerprint=row.request_fingerprint,
            new_row_id=row.id,
        )
        if outcome.inserted:  # a repeat later in the batch is decided against it
            existing[cid] = row_from_values(new_row_values(row))
        outcomes.append(outcome)
    if inserted:
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
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


# Completion may carry the delay before a retry (`retry_in_ms`, relative, so
# no host clock enters it); until it does, the retry time is translated.
_retry_in: Callable[[Completion], int | None] | None = (
    operator.attrgetter("retry_in_ms") if "retry_in_ms" in attrs.fields_dict(Completion) else None
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
    retry_in = [None] * len(completions) if _retry_in is None else [_retry_in(c) for c in completions]
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


# -- the same statements on the wire (`_wire`): no thread, one pipeline each

# A new row binds the columns `NewRow` holds but the two times the server
# stamps; every other column starts NULL.
NEW_BOUND = tuple(c for c in NEW_COLUMNS if c not in STAMPED)
_NEW_BOUND_AT = [NEW_COLUMNS.index(c) for c in NEW_BOUND]
_NEW_TYPES = [COLUMN_TYPES[c] for c in NEW_BOUND]

#: Rows of a batch sent in one statement.
CHUNK = 250

# Only a row with an ordering key reads its lane.
_NEW_ENQUEUED_AT = f"CASE WHEN u.ordering_key IS NULL THEN {SERVER_NOW} ELSE {_LANE_ENQUEUED_AT} END"


def _new_rows_insert(source: str) -> str:
    """The insert of new rows from `source` (columns `NEW_BOUND`), which
    returns how many it inserted and tells the workers (NOTIFY, delivered
    at commit) when that is any: the uncorrelated subquery runs once, and
    not at all when every row was already there."""
    values = ", ".join(
        _NEW_ENQUEUED_AT if c == "enqueued_at" else SERVER_NOW if c in STAMPED else f"u.{c}"
        for c in NEW_COLUMNS
    )
    return (
        f"WITH inserted AS (INSERT INTO outbox ({', '.join(NEW_COLUMNS)}, lane_blocked)"
        f" SELECT {values}, (u.ordering_key IS NOT NULL)::integer FROM {source} AS u({', '.join(NEW_BOUND)})"
        " ON CONFLICT (client_message_id) DO NOTHING RETURNING 1)"
        f" SELECT n, CASE WHEN n > 0 THEN (SELECT pg_notify('{CHANNEL}', '')) IS NULL END"
        " FROM (SELECT count(*) AS n FROM inserted) AS c"
    )


NEW_ROWS = _new_rows_insert("unnest(" + ", ".join(f"%s::{t}[]" for t in _NEW_TYPES) + ")")
NEW_ROW = _new_rows_insert("(VALUES (" + ", ".join(f"%s::{t}" for t in _NEW_TYPES) + "))")

_SCALAR: dict[str, Callable[[Any], bytes | None]] = {
    "text": wire.text,
    "bytea": lambda v: v,
    "bigint": wire.int8,
    "integer": wire.int4,
}
_NEW_SCALARS = [(at, _SCALAR[t]) for at, t in zip(_NEW_BOUND_AT, _NEW_TYPES, strict=True)]


def _column(kind: str, values: Sequence[Any]) -> bytes:
    if kind == "text":
        return wire.text_array(values)
    if kind == "bytea":
        return wire.array("bytea[]", values)
    if kind == "bigint":
        return wire.int8_array(values)
    return wire.int4_array(values)


@functools.lru_cache(maxsize=64)
def statement(sql: str, types: tuple[str, ...]) -> wire.Statement:
    return wire.Statement.of(sql, types)


def _types(args: Sequence[Any]) -> tuple[str, ...]:
    return tuple("bigint" if isinstance(a, int) else "text" for a in args)


def _params(args: Sequence[Any]) -> list[bytes | None]:
    return [wire.int8(a) if isinstance(a, int) else wire.text(a) for a in args]


_LOCK = wire.Statement.of(LOCK_SQL, ("text",))
_RELEASE_NEXT = wire.Statement.of(release_next_sql(POSTGRES), ("text", "bigint", "text", "text"))
_SETTLE_JOINED = wire.Statement.of(SETTLE_JOINED_FIRST_OF, ("text[]",))
_EXISTING = wire.Statement.of(SELECT + " WHERE client_message_id = ANY(%s::text[])", ("text[]",))


def lock_lanes(w: wire.Wire, keys: Sequence[str]) -> None:
    for key in keys:
        w.send(_LOCK, [key.encode()])


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
        (c.ordering_key, c.enqueued_at, c.row_id) for c in completions if c.ordering_key and releases_lane(c)
    ]


@attrs.define(eq=False)
class NewRows:
    """`accept`'s write of `rows` as steps that any driver of a wire runs
    (the pool's, from Trio; `accept_in`'s, blocking): `send` queues the
    lanes' locks, the insert (with its NOTIFY) and the lanes' settling;
    `inserted` reads from their answers how many rows went in; if fewer
    than `firsts`, some client_message_id was taken, and `send_read` queues
    the read of the rows that hold the batch's ids; `outcomes` decides each
    row from those answers by the idempotency table."""

    rows: Sequence[NewRow]
    #: The first row of each client_message_id, which alone is offered for
    #: insert: a repeat later in the batch is decided against it, like any
    #: other existing row. ON CONFLICT waits for a concurrent insert of the
    #: same id to commit or roll back, so exactly one of them wins and the
    #: others read the winner's row.
    first_of: dict[str, NewRow]
    lanes: list[str]

    @classmethod
    def of(cls, rows: Sequence[NewRow]) -> NewRows:
        first_of: dict[str, NewRow] = {}
        for r in rows:
            first_of.setdefault(r.client_message_id, r)
        return cls(rows, first_of, lane_keys(r.ordering_key for r in first_of.values()))

    @property
    def firsts(self) -> list[NewRow]:
        return list(self.first_of.values())

    def send(self, w: wire.Wire, sql: tuple[str, str] = (NEW_ROW, NEW_ROWS)) -> None:
        """Queue the write (`sql` is (`NEW_ROW`, `NEW_ROWS`), or their copies
        under a test's stand-in for the server's clock). A big batch goes in
        chunks, each sent as soon as it is encoded, so that the server
        inserts one while the next is prepared (all in one transaction)."""
        firsts = self.firsts
        lock_lanes(w, self.lanes)
        if len(firsts) == 1:
            (row,) = firsts
            w.send(statement(sql[0], tuple(_NEW_TYPES)), [dump(row[at]) for at, dump in _NEW_SCALARS])
        else:
            insert = statement(sql[1], tuple(f"{t}[]" for t in _NEW_TYPES))
            for start in range(0, len(firsts), CHUNK):
                columns = list(zip(*firsts[start : start + CHUNK], strict=True))
                w.send(
                    insert, [_column(t, columns[at]) for at, t in zip(_NEW_BOUND_AT, _NEW_TYPES, strict=True)]
                )
                w.push()
        for ids in joined_by_lane(firsts):
            w.send(_SETTLE_JOINED, [wire.text_array(ids)])

    def inserted(self, results: Sequence[Any]) -> int:
        """How many rows the write inserted, from the answers of `send`'s statements."""
        lanes = len(self.lanes)
        return sum(_I(found.get_value(0, 0)) or 0 for found in results[lanes : len(results) - lanes])

    def all_in(self, results: Sequence[Any]) -> bool:
        """Whether every first row went in (else `send_read`, then `outcomes`)."""
        return self.inserted(results) == len(self.first_of)

    def send_read(self, w: wire.Wire) -> None:
        """Queue the read of the rows holding the batch's ids."""
        w.send(_EXISTING, [wire.text_array(list(self.first_of))])

    def outcomes(self, read: Any = None) -> Outcomes:
        """Each row's outcome: every first row inserted, or decided against
        the rows `read` (the answer of `send_read`) found."""
        first_of = self.first_of
        existing: dict[str, OutboxRow] = {}
        if read is not None:
            # The rows this write inserted carry its row ids.
            new_id = {cid: r.id for cid, r in first_of.items()}
            for values in wire.rows(read):
                prior = row_from_wire(values)
                if new_id.pop(prior.client_message_id) != prior.id:
                    existing[prior.client_message_id] = prior
            if new_id:  # deleted between the conflict and the read (a prune)
                raise StoreUnavailable(f"rows {sorted(new_id)[:3]} vanished during accept; retry")
        if not existing:
            return [
                decide_accept(
                    None,
                    client_message_id=r.client_message_id,
                    fingerprint=r.request_fingerprint,
                    new_row_id=r.id,
                )
                if r is first_of[r.client_message_id]
                else _repeat(r, first_of[r.client_message_id])
                for r in self.rows
            ]
        outcomes = []
        for row in self.rows:
            cid = row.client_message_id
            outcome = decide_accept(
                existing.get(cid),
                client_message_id=cid,
                fingerprint=row.request_fingerprint,
                new_row_id=row.id,
            )
            if outcome.inserted:  # a repeat later in the batch is decided against it
                existing[cid] = row_from_values(new_row_values(row))
            outcomes.append(outcome)
        return outcomes


async def insert_new_rows(
    w: wire.Wire, rows: Sequence[NewRow], sql: tuple[str, str] = (NEW_ROW, NEW_ROWS)
) -> Outcomes:
    """`accept`'s write on the wire: one round trip, one implicit
    transaction (the lanes' locks, the insert and its NOTIFY, the lanes'
    settling), unless some client_message_id was taken (then a second
    reads the rows holding them)."""
    if not rows:
        return []
    write = NewRows.of(rows)
    write.send(w, sql)
    if write.all_in(await w.exchange()):
        return write.outcomes()
    write.send_read(w)
    (read,) = await w.exchange()
    return write.outcomes(read)


def _repeat(row: NewRow, first: NewRow) -> Any:
    """The outcome of a repeat, later in one batch, of a row the batch inserted."""
    return decide_accept(
        row_from_values(new_row_values(first)),
        client_message_id=row.client_message_id,
        fingerprint=row.request_fingerprint,
        new_row_id=row.id,
    )


_T, _B, _I = wire.as_text, (lambda v: v), wire.as_int
_DECODE = {"text": _T, "bytea": _B, "bigint": _I, "integer": _I}
_COLUMN_DECODERS = [_DECODE[COLUMN_TYPES[c]] for c in COLUMNS]


def row_from_wire(values: Sequence[bytes | None]) -> OutboxRow:
    """An OutboxRow from a row of binary values in `COLUMNS` order."""
    return row_from_values([decode(v) for decode, v in zip(_COLUMN_DECODERS, values, strict=False)])


_SYNC_OFF = wire.Statement.of("SET LOCAL synchronous_commit = off", ())


def begin_worker_write(w: wire.Wire, lanes: Sequence[str] = ()) -> None:
    """Open a transaction of the worker's (claims, outcomes): losing one to
    a server crash is harmless (the lease brings the row back, and the
    broker dedupes the resend), so it does not wait for the WAL flush."""
    w.send(wire.BEGIN, ())
    w.send(_SYNC_OFF, ())
    lock_lanes(w, lanes)


def send_claim(w: wire.Wire, sql: str, args: Sequence[Any]) -> None:
    w.send(statement(sql, _types(args)), _params(args))


def claimed_rows(result: Any, commit: Commit | None) -> Rows:
    """The rows a claim returned, in claim order; notes its transaction id."""
    found = [
        [
            *(decode(v) for decode, v in zip(_COLUMN_DECODERS, values, strict=False)),
            _I(values[XID_AT]),
            _I(values[XID_AT + 1]),
        ]
        for values in wire.rows(result)
    ]
    if found and commit is not None:
        commit.xid = found[0][XID_AT]
    return in_claim_order(found)


_COMPLETE_TYPES = (
    "bigint",
    "bigint",
    "text[]",
    "text[]",
    "text[]",
    "integer[]",
    "bigint[]",
    "text[]",
    "bigint[]",
    "text[]",
    "bigint[]",
)


def send_complete(
    w: wire.Wire, sql: str, completions: Sequence[Completion], *, host_now: int | None, offset: int
) -> None:
    """Queue the fenced completion (`sql` is `COMPLETE`) and the settling
    of the lanes it releases (`completed_lanes`: lock them first)."""
    retry_in = [None] * len(completions) if _retry_in is None else [_retry_in(c) for c in completions]
    w.send(
        statement(sql, _COMPLETE_TYPES),
        [
            wire.int8(host_now),
            wire.int8(offset),
            wire.text_array([c.row_id for c in completions]),
            wire.text_array([c.lease_token for c in completions]),
            wire.text_array([c.status.value for c in completions]),
            wire.int4_array([c.attempts for c in completions]),
            wire.int8_array([c.next_attempt_at for c in completions]),
            wire.text_array([c.last_error for c in completions]),
            wire.int8_array([c.delivered_at for c in completions]),
            wire.text_array([c.broker_message_id for c in completions]),
            wire.int8_array(retry_in),
        ],
    )
    for key, at, row_id in released_rows(completions):
        w.send(_RELEASE_NEXT, [key.encode(), wire.int8(at), row_id.encode(), row_id.encode()])


def completed_lanes(completions: Sequence[Completion]) -> list[str]:
    """The lanes whose heads `completions` may release (lock them first)."""
    return lane_keys(c.ordering_key for c in completions if releases_lane(c))


def applied_of(result: Any, completions: Sequence[Completion], commit: Commit | None) -> Applied:
    found = wire.rows(result)
    if found and commit is not None:
        commit.xid = _I(found[0][2])
    applied = {(_T(r[0]), _T(r[1])) for r in found}
    return [(c.row_id, c.lease_token) in applied for c in completions]
