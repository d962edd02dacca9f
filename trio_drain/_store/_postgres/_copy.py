"""A big batch as binary COPY: `accept_many` of rows without ordering keys,
validated chunk by chunk while the server writes the chunks before.

The server's work a row is about two thirds of the insert's (no arrays to
unnest, no ON CONFLICT probe), and the rows are validated, encoded and sent
chunk by chunk while the server writes the ones before (a COPY takes its
data as it comes), where the insert's statement could only start once the
whole batch was validated and encoded. COPY has no ON CONFLICT: a taken
client_message_id fails the whole COPY, which then rolls back, and the batch
is written again by the insert (`insert_new_rows`), which decides each row.
A batch sent again whole (a producer's retry) would pay for both, so the
query first looks up the batch's first id, and if it is taken the COPY is
abandoned before any row is sent. A row in an ordering lane needs its
lane's lock before any row is written: a batch whose first chunk has one
goes to the insert, and one found later abandons the COPY for the insert.

The two times are the server's now, as the insert stamps them: the
statements of one simple query share their statement_timestamp(), so the
query reads it first and the COPY's rows carry that value. The NOTIFY
follows the COPY in the same implicit transaction, whose commit waits for
the WAL flush like any accept's. libpq runs no COPY in pipeline mode, so a
copied batch is two round trips: the query, answered when the server takes
the data, then the data and its end, answered at the commit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from typing import Any

import psycopg
import psycopg.errors

from ..._model import NewRow
from .._base import NEW_COLUMNS, Outcomes
from .._sql import SERVER_NOW
from . import _wire as wire
from ._pipelines import NewRows, insert_new_rows
from ._schema import COLUMN_TYPES
from ._statements import CHANNEL, STAMPED

# Columns the same in every row of a chunk (the two times always; the
# others often) come first, so that their cells merge into one run of
# bytes repeated a row.
COPY_COLUMNS = (
    *STAMPED,
    "status",
    "attempts",
    "priority",
    "mesh",
    "target_spec",
    "nonce",
    "ciphertext",
    "sender_session_pubkey",
    "id",
    "client_message_id",
    "request_fingerprint",
    "payload",
)
#: The server's now, whether the batch's first id (`FIRST_ID`) is taken,
#: the COPY, and the NOTIFY.
COPY_SQL = (
    f"SELECT {SERVER_NOW}, EXISTS (SELECT 1 FROM outbox WHERE client_message_id = $first_id);"
    f" COPY outbox ({', '.join(COPY_COLUMNS)}) FROM STDIN (FORMAT binary);"
    f" SELECT pg_notify('{CHANNEL}', '')"
)
FIRST_ID = b"$first_id"
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, no flags, no extension
COPY_TRAILER = b"\xff\xff"
_FIELDS = len(COPY_COLUMNS).to_bytes(2, "big")
_LENGTH = struct.Struct("!i").pack
_NULL = b"\xff\xff\xff\xff"
_ORDERING_KEY_AT = NEW_COLUMNS.index("ordering_key")


def _dumper(kind: str) -> Callable[[Any], bytes] | None:
    """A column's values to binary (None: they are bytes already)."""
    if kind == "text":
        return str.encode
    if kind == "integer":
        return lambda v: v.to_bytes(4, "big", signed=True)
    return None


#: The columns after the times: where a row holds each, its encoder, and
#: whether its value may repeat through a chunk (the ids, the fingerprint
#: and the payload differ from row to row, and comparing payloads would
#: cost more than it saves).
_COPY_CELLS = [
    (
        NEW_COLUMNS.index(c),
        _dumper(COLUMN_TYPES[c]),
        c not in ("id", "client_message_id", "request_fingerprint", "payload"),
    )
    for c in COPY_COLUMNS[len(STAMPED) :]
]


def _to8(v: int) -> bytes:
    return v.to_bytes(8, "big", signed=True)


def _cell(dump: Callable[[Any], bytes] | None, value: Any) -> bytes:
    if value is None:
        return _NULL
    data = value if dump is None else dump(value)
    return _LENGTH(len(data)) + data


def copy_rows(rows: Sequence[NewRow], now: int) -> bytes:
    """`rows` as binary COPY tuples of `COPY_COLUMNS`, their times `now`
    (the server's), built a column at a time (at C speed) and interleaved
    row by row."""
    n = len(rows)
    if not n:
        return b""
    columns = list(zip(*rows, strict=True))
    parts: list[Any] = []
    run = _FIELDS + _cell(_to8, now) * len(STAMPED)  # cells the same in every row, pending
    for at, dump, may_repeat in _COPY_CELLS:
        values = columns[at]
        first = values[0]
        if may_repeat and values.count(first) == n:
            run += _cell(dump, first)
            continue
        if run:
            parts.append(repeat(run, n))
            run = b""
        data: Sequence[Any]
        if None in values:
            data = [b"" if v is None else v if dump is None else dump(v) for v in values]
            parts.append([_NULL if v is None else _LENGTH(len(d)) for v, d in zip(values, data, strict=True)])
        else:
            data = values if dump is None else list(map(dump, values))
            parts.append(map(_LENGTH, map(len, data)))
        parts.append(data)
    if run:
        parts.append(repeat(run, n))
    return b"".join(chain.from_iterable(zip(*parts, strict=True)))


def in_lanes(rows: Sequence[NewRow]) -> bool:
    """Whether any of `rows` has an ordering key."""
    return any(r[_ORDERING_KEY_AT] is not None for r in rows)


#: Rows of a streamed batch validated and sent at a time: a few first, so
#: that the server starts early, then bigger chunks.
FIRST_CHUNK, NEXT_CHUNK = 64, 256


async def copy_new_rows(
    w: wire.Wire, take: Callable[[int], list[NewRow]], first: list[NewRow], copy: str, sql: tuple[str, str]
) -> Outcomes:
    """Copy a batch into the table as its rows are validated: `first` is
    its first chunk (no row in a lane), `take(k)` validates and returns the
    next `k` rows (fewer at the end, none once done; it raises
    InvalidRequest for a malformed request, and then nothing is written).
    `copy` is `COPY_SQL` (or its copy under a test's stand-in for the
    server's clock). Falls back to the insert (`sql`, as `insert_new_rows`
    takes it) when a client_message_id is taken or a later row is in a lane."""
    rows = list(first)
    first_of: dict[str, NewRow] = {}
    w.copy_in(copy.encode().replace(FIRST_ID, w.literal(first[0].client_message_id)))
    try:
        later = take(NEXT_CHUNK)  # while the query goes out and the server answers
    except BaseException:
        await _abandon(w, "a request was refused", started=False)
        raise
    rows += later
    (found,) = await w.copy_ready()
    if found.get_value(0, 1) == b"t":  # sent before, most likely whole: no COPY
        await _abandon(w, "its first id is taken")
        return await insert_new_rows(w, rows + take_rest(take), sql)
    now_ms = int(found.get_value(0, 0) or b"")  # (text: a simple query's answer)
    chunk = first
    try:
        w.copy_data(COPY_HEADER)
        while chunk and not in_lanes(chunk):
            fresh = [r for r in chunk if first_of.setdefault(r.client_message_id, r) is r]
            w.copy_data(copy_rows(fresh, now_ms))
            chunk, later = later, (take(NEXT_CHUNK) if later else [])
            rows += later
    except BaseException:
        await _abandon(w, "a request was refused")
        raise
    if chunk:  # a row in a lane, whose lock comes first: the insert writes it all
        await _abandon(w, "a row in an ordering lane")
        return await insert_new_rows(w, rows + take_rest(take), sql)
    w.copy_data(COPY_TRAILER)
    # Decided while the server finishes: if the COPY goes through, every
    # first row is in.
    outcomes = NewRows(rows, first_of, []).outcomes()
    try:
        await w.copy_end()
    except psycopg.errors.UniqueViolation:
        return await insert_new_rows(w, rows, sql)
    return outcomes


def take_rest(take: Callable[[int], list[NewRow]]) -> list[NewRow]:
    """Every row `take` has left, validated."""
    rows: list[NewRow] = []
    while chunk := take(NEXT_CHUNK):
        rows += chunk
    return rows


async def _abandon(w: wire.Wire, why: str, *, started: bool = True) -> None:
    """End the COPY in progress with an error, so that its transaction
    rolls back (not `started`: first wait until the server takes it)."""
    try:
        if not started:
            await w.copy_ready()
        await w.copy_end(error=f"abandoned by trio-drain: {why}")
    except psycopg.errors.QueryCanceled:
        pass  # what an abandoned COPY answers
