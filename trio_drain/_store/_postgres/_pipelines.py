"""The PostgreSQL hot path's statements on the wire (`_wire`): no thread, one
pipeline each. `NewRows` is `accept`'s write (the lanes' locks, the insert
with its NOTIFY, the lanes' settling) for any driver of a wire; the rest
queue the worker's claims and fenced outcomes and read their answers. The
SQL they send is `_statements`'."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..._errors import StoreUnavailable
from ..._idempotency import decide_accept
from ..._lifecycle import Completion
from ..._model import NewRow, OutboxRow
from .._base import (
    COLUMNS,
    NEW_COLUMNS,
    Applied,
    Outcomes,
    Rows,
    in_claim_order,
    new_row_values,
    row_from_values,
)
from .._lanes import LOCK_SQL, SETTLE_JOINED_FIRST_OF, lane_keys, release_next_sql
from .._reads import SELECT
from .._sql import POSTGRES, SERVER_NOW
from . import _wire as wire
from ._pool import Commit
from ._schema import COLUMN_TYPES
from ._statements import (
    CHANNEL,
    LANE_ENQUEUED_AT,
    STAMPED,
    XID_AT,
    decide_each,
    joined_by_lane,
    released_rows,
)

# A new row binds the columns `NewRow` holds but the two times the server
# stamps; every other column starts NULL.
NEW_BOUND = tuple(c for c in NEW_COLUMNS if c not in STAMPED)
_NEW_BOUND_AT = [NEW_COLUMNS.index(c) for c in NEW_BOUND]
_NEW_TYPES = [COLUMN_TYPES[c] for c in NEW_BOUND]

#: Rows of a batch sent in one statement.
CHUNK = 250

# Only a row with an ordering key reads its lane.
_NEW_ENQUEUED_AT = f"CASE WHEN u.ordering_key IS NULL THEN {SERVER_NOW} ELSE {LANE_ENQUEUED_AT} END"


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
        return decide_each(self.rows, existing)


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
    retry_in = [c.retry_in_ms for c in completions]
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


def applied_of(result: Any, completions: Sequence[Completion], commit: Commit | None) -> Applied:
    found = wire.rows(result)
    if found and commit is not None:
        commit.xid = _I(found[0][2])
    applied = {(_T(r[0]), _T(r[1])) for r in found}
    return [(c.row_id, c.lease_token) in applied for c in completions]
