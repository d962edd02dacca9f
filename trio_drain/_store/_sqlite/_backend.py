"""The SQLite back end: one file, WAL, group commit, no blocking call on Trio.

Threading model: one write connection, used only by a writer thread of
the store's own, and one read connection, used only through
`trio.to_thread.run_sync` under a limiter of one; so a connection is never
used by two threads at once (`check_same_thread=False` is safe under that
rule). Writes are never abandoned on cancellation.

Group commit (`_group_commit`): every write is an operation queued for
the writer thread, and what is queued while it is busy goes in the next
transaction, so N concurrent `accept` calls share one fsync. SQLite's
errors become ours in `_sqlite_errors`.

Only what a caller was promised needs an fsync: accepted rows and operator
actions. The worker's claims and completions commit without one, since
losing them to a power cut is harmless (the row is claimed again, or sent
again and deduped by the broker). A batch is fsynced if any of its
operations needs it.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio

from ... import _crashpoints, _lifecycle
from ..._errors import (
    CorruptDatabase,
    StoreClosed,
    StoreError,
    UnknownRow,
)
from ..._lifecycle import Completion, UnknownFate
from ..._model import NewRow, OutboxRow, Status
from .._base import (
    COLUMNS,
    INDEXES,
    NEW_COLUMNS,
    NO_FILTER,
    Applied,
    Durability,
    Outcomes,
    RouteFilter,
    Rows,
    check_durability,
    in_claim_order,
    list_query,
    only_route_clause,
    record_schema_version,
    row_from_values,
    row_values,
    schema_version,
    write_aborted,
)
from .._group_commit import GroupCommitter, Joint
from ._errors import translated

T = TypeVar("T")

_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM outbox"
_INSERT = "INSERT INTO outbox (" + ", ".join(COLUMNS) + ") VALUES (" + ", ".join("?" * len(COLUMNS)) + ")"
# New rows bind only the columns they set (the rest default to NULL).
_INSERT_NEW = (
    "INSERT INTO outbox (" + ", ".join(NEW_COLUMNS) + ") VALUES (" + ", ".join("?" * len(NEW_COLUMNS)) + ")"
    " ON CONFLICT (client_message_id) DO NOTHING"
)

# The table as the seed's daemon wrote it, plus the lease columns.
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id                    TEXT PRIMARY KEY,
    client_message_id     TEXT NOT NULL UNIQUE,
    request_fingerprint   BLOB NOT NULL,
    payload               BLOB NOT NULL,
    enqueued_at           INTEGER NOT NULL,
    attempts              INTEGER NOT NULL DEFAULT 0,
    next_attempt_at       INTEGER NOT NULL,
    status                TEXT NOT NULL
        CHECK (status IN ('pending', 'inflight', 'done', 'dead', 'aborted')),
    last_error            TEXT,
    delivered_at          INTEGER,
    broker_message_id     TEXT,
    aborted_at            INTEGER,
    aborted_by            TEXT,
    superseded_by         TEXT,
    mesh                  TEXT,
    target_spec           TEXT,
    nonce                 TEXT,
    ciphertext            TEXT,
    priority              TEXT,
    sender_session_pubkey TEXT,
    lease_expires_at      INTEGER,
    lease_token           TEXT
)
"""

# Columns a table written by an older daemon may lack, added in place.
_ADDED_COLUMNS = {
    "mesh": "TEXT",
    "target_spec": "TEXT",
    "nonce": "TEXT",
    "ciphertext": "TEXT",
    "priority": "TEXT",
    "sender_session_pubkey": "TEXT",
    "lease_expires_at": "INTEGER",
    "lease_token": "TEXT",
}

# Claim order as a column, so one partial index serves the claim query.
_ADD_PRIORITY_RANK = (
    "ALTER TABLE outbox ADD COLUMN priority_rank INTEGER GENERATED ALWAYS AS"
    " (CASE priority WHEN 'now' THEN 0 WHEN 'low' THEN 2 ELSE 1 END) VIRTUAL"
)


# -- what the SQL needs ---------------------------------------------------------------

#: The oldest SQLite this SQL runs on: RETURNING (claims) came in 3.35.0 and
#: its early defects were fixed by 3.35.5; UPDATE ... FROM (completions)
#: needs 3.33.0, generated columns (priority_rank) 3.31.0, PRAGMA
#: table_xinfo (migration) 3.26.0 and ON CONFLICT DO NOTHING (accept) 3.24.0.
MIN_SQLITE = (3, 35, 5)


def _check_sqlite_version() -> None:
    """Refuse an SQLite library too old for the outbox's SQL, before any file
    is touched (it would otherwise fail every claim, and the worker retry
    it forever)."""
    found = tuple(sqlite3.sqlite_version_info)
    if found < MIN_SQLITE:
        raise StoreError(
            f"the SQLite library is version {sqlite3.sqlite_version}; trio-drain needs"
            f" {'.'.join(map(str, MIN_SQLITE))} or newer (RETURNING, UPDATE ... FROM, generated"
            " columns): use a Python built against a newer SQLite"
        )


def _route_clause(exclude: RouteFilter) -> tuple[str, list[Any]]:
    """SQL that leaves out rows of blocked routes (mirrors RouteFilter.blocks)."""
    parts: list[str] = []
    params: list[Any] = []
    if exclude.sessions:
        marks = ", ".join("?" * len(exclude.sessions))
        parts.append(f"(sender_session_pubkey IS NULL OR sender_session_pubkey NOT IN ({marks}))")
        params.extend(sorted(exclude.sessions))
    if exclude.meshes:
        marks = ", ".join("?" * len(exclude.meshes))
        parts.append(f"(sender_session_pubkey IS NOT NULL OR mesh IS NULL OR mesh NOT IN ({marks}))")
        params.extend(sorted(exclude.meshes))
    if exclude.null_mesh:
        parts.append("(sender_session_pubkey IS NOT NULL OR mesh IS NOT NULL)")
    clause = "".join(" AND " + p for p in parts)
    if exclude.only is not None:
        only, only_params = only_route_clause(exclude.only, "?")
        clause += only
        params.extend(only_params)
    return clause, params


def _claim_statement(
    now: int, limit: int, lease_ms: int, max_age_ms: int, token: str, exclude: RouteFilter
) -> tuple[str, list[Any]]:
    clause, params = _route_clause(exclude)
    # INDEXED BY pins the claim index: the planner would otherwise often
    # pick outbox_due and sort the whole backlog.
    sql = (
        "UPDATE outbox SET status = 'inflight', attempts = attempts + 1,"
        " lease_token = ?, lease_expires_at = ?"
        " WHERE id IN (SELECT id FROM outbox INDEXED BY outbox_claim"
        "  WHERE status = 'pending' AND next_attempt_at <= ? AND enqueued_at >= ?"
        + clause
        + "  ORDER BY priority_rank, enqueued_at LIMIT ?)"
        " RETURNING " + ", ".join(COLUMNS) + ", priority_rank"
    )
    return sql, [token, now + lease_ms, now, now - max_age_ms, *params, limit]


def _claim(conn: sqlite3.Connection, sql: str, args: list[Any]) -> Rows:
    found = conn.execute(sql, args).fetchall()
    _crashpoints.reached("claim_before_commit")
    return in_claim_order(found)


# The fence (still inflight under the completion's token) is in the WHERE.
_COMPLETE_ONE = (
    "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
    " delivered_at = ?, broker_message_id = ?, lease_token = NULL, lease_expires_at = NULL"
    " WHERE id = ? AND status = 'inflight' AND lease_token = ?"
)
# Many at once: the same update joined to a table of completions. SQLite
# allows 32,766 bound values; 8 a row, in chunks well under that.
_COMPLETE_CHUNK = 1000


@functools.lru_cache(maxsize=64)  # one string per batch size: SQLite's statement cache hits
def _complete_many_sql(n: int) -> str:
    return (
        "WITH c(status, attempts, next_attempt_at, last_error, delivered_at, broker_message_id, id, token)"
        " AS (VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n) + ")"
        " UPDATE outbox SET status = c.status, attempts = c.attempts, next_attempt_at = c.next_attempt_at,"
        " last_error = c.last_error, delivered_at = c.delivered_at, broker_message_id = c.broker_message_id,"
        " lease_token = NULL, lease_expires_at = NULL"
        " FROM c WHERE outbox.id = c.id AND outbox.status = 'inflight' AND outbox.lease_token = c.token"
    )


def _complete(conn: sqlite3.Connection, completions: Sequence[Completion]) -> Applied:
    """Apply completions; per completion, whether its row was still inflight
    under its token.

    One statement per chunk. When it changed as many rows as it had
    completions (the usual case) every one applied; otherwise (a stale
    lease, or a row twice) the chunk is undone and applied row by row,
    which says which ones took.
    """
    applied: list[bool] = []
    for start in range(0, len(completions), _COMPLETE_CHUNK):
        chunk = completions[start : start + _COMPLETE_CHUNK]
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
        conn.execute("SAVEPOINT complete")
        before = conn.total_changes
        conn.execute(_complete_many_sql(len(chunk)), [v for row in values for v in row])
        if conn.total_changes - before == len(chunk):
            applied.extend([True] * len(chunk))
        else:
            conn.execute("ROLLBACK TO complete")
            applied.extend(conn.execute(_COMPLETE_ONE, row).rowcount == 1 for row in values)
        _crashpoints.reached("completion_mid_batch")
        conn.execute("RELEASE complete")
    return applied


class _Insert:
    """`accept`'s write: insert new rows, each decided against the row that
    holds its client_message_id."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[NewRow]) -> None:
        self.rows = rows

    def __call__(self, conn: sqlite3.Connection) -> Outcomes:
        # Insert everything, skipping ids already taken; the write lock is
        # held, so nothing slips in between. When every row went in (the
        # common case) there is nothing to look up.
        inserted = _Insert.jointly(conn, [self])
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
            for found in conn.execute(_SELECT + f" WHERE client_message_id IN ({marks})", chunk):
                holder = row_from_values(found)
                holders[holder.client_message_id] = holder
        outcomes = []
        for row in self.rows:
            holder = holders[row.client_message_id]
            outcomes.append(
                _lifecycle.decide_accept(
                    None if holder.id == row.id else holder,
                    client_message_id=row.client_message_id,
                    fingerprint=row.request_fingerprint,
                    new_row_id=row.id,
                )
            )
        return outcomes

    @staticmethod
    def jointly(conn: sqlite3.Connection, inserts: list[_Insert]) -> list[Outcomes] | None:
        """The inserts of concurrent `accept` calls as one statement (group
        commit's writer-side half). Any id already taken, and they go one by
        one instead (None), so that each caller gets its own answer."""
        rows = [row for insert in inserts for row in insert.rows]
        before = conn.total_changes
        conn.executemany(_INSERT_NEW, rows)  # NewRows are the parameters as they stand
        if conn.total_changes - before != len(rows):
            return None
        return [_all_inserted(insert.rows) for insert in inserts]


def _all_inserted(rows: Sequence[NewRow]) -> Outcomes:
    return [
        _lifecycle.decide_accept(
            None, client_message_id=r.client_message_id, fingerprint=r.request_fingerprint, new_row_id=r.id
        )
        for r in rows
    ]


# -- the back end ------------------------------------------------------------------


class SqliteBackend:
    """An outbox in one SQLite file. Build it with `SqliteBackend.open`."""

    def __init__(
        self, path: Path, writer: sqlite3.Connection, reader: sqlite3.Connection, *, durability: Durability
    ) -> None:
        self.path = path
        self.durability = durability
        self._writer = writer
        self._reader = reader
        self._committer = GroupCommitter(writer, durable=durability == "full")
        self._read_limiter = trio.CapacityLimiter(1)
        self._closed = False

    # -- opening

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, durability: Durability = "full") -> SqliteBackend:
        check_durability(durability)
        return await trio.to_thread.run_sync(cls._open_sync, Path(path), durability)

    @classmethod
    def _open_sync(cls, path: Path, durability: Durability) -> SqliteBackend:
        _check_sqlite_version()
        if path.exists():
            if path.is_dir():
                raise StoreError(f"{path} is a directory, not an outbox database")
            _check_integrity(path)
        else:
            if not path.parent.is_dir():
                raise StoreError(f"cannot create {path}: folder {path.parent} does not exist")
            # Created by us, 0600, before SQLite opens it; SQLite gives the WAL
            # and shared-memory files the same mode.
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create {path}: {exc.strerror}") from None
        writer = reader = None
        try:
            with translated():
                writer = _connect(path, durability)
                _migrate(writer)
                reader = _connect(path, durability)
        except BaseException:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            raise
        return cls(path, writer, reader, durability=durability)

    # -- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the outbox is closed")

    async def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True, joint: Joint | None = None
    ) -> T:
        self._check_open()
        return await self._committer.submit(fn, durable=durable, joint=joint)

    async def on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with the write connection on the writer thread, between
        batches and outside any transaction (for settings such as PRAGMAs,
        which must never meet a batch half-way). Not for writes: they
        belong in a transaction."""
        self._check_open()
        return await self._committer.submit(fn, durable=False, bare=True)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()

        def run() -> T:
            with translated():
                return fn(self._reader)

        return await trio.to_thread.run_sync(run, limiter=self._read_limiter)

    @property
    def commit_statistics(self) -> tuple[int, int]:
        """(transactions committed, write operations in them)."""
        return self._committer.batches, self._committer.operations

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait out a batch in progress; it is never abandoned.
        with trio.CancelScope(shield=True):
            await self._committer.aclose()
            await trio.to_thread.run_sync(self._reader.close, limiter=self._read_limiter)

    # -- accept

    async def accept_many(self, rows: Sequence[NewRow]) -> Outcomes:
        return await self._write(_Insert(rows), joint=_Insert.jointly)

    # -- the worker's side

    async def claim(
        self,
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> Rows:
        claim = _claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: sqlite3.Connection) -> Rows:
            return _claim(conn, *claim)

        return await self._write(op, durable=False)

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        def op(conn: sqlite3.Connection) -> Applied:
            return _complete(conn, completions)

        return await self._write(op, durable=False)

    async def complete_and_claim(
        self,
        completions: Sequence[Completion],
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> tuple[Applied, Rows]:
        claim = _claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: sqlite3.Connection) -> tuple[Applied, Rows]:
            return _complete(conn, completions), _claim(conn, *claim)

        return await self._write(op, durable=False)

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        expired = "status = 'inflight' AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
        # The state machine's two answers, at the attempt cap and below it.
        fates = [
            (_lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=cap), cap) for cap in (True, False)
        ]

        def op(conn: sqlite3.Connection) -> int:
            moved = 0
            for (status, error), at_cap in fates:
                due = "?" if status is Status.PENDING else "next_attempt_at"  # put back: due at once
                moved += conn.execute(
                    f"UPDATE outbox SET status = ?, last_error = ?, next_attempt_at = {due},"
                    f" lease_token = NULL, lease_expires_at = NULL WHERE {expired}"
                    + (" AND attempts >= ?" if at_cap else ""),
                    (
                        status.value,
                        error,
                        *([now] if status is Status.PENDING else []),
                        now,
                        *([max_attempts] if at_cap else []),
                    ),
                ).rowcount
            return moved

        return await self._write(op, durable=False)

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE outbox SET status = 'dead', last_error = ?"
                " WHERE status = 'pending' AND enqueued_at < ?",
                (_lifecycle.EXPIRED, now - max_age_ms),
            ).rowcount

        return await self._write(op, durable=False)

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        clause, params = _route_clause(exclude)
        sql = (
            "SELECT next_attempt_at FROM outbox INDEXED BY outbox_due"
            " WHERE status = 'pending' AND enqueued_at >= ?" + clause + " ORDER BY next_attempt_at LIMIT 1"
        )

        def op(conn: sqlite3.Connection) -> int | None:
            found = conn.execute(sql, [now - max_age_ms, *params]).fetchone()
            return None if found is None else int(found[0])

        return await self._read(op)

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """SQLite has no cross-process notifications: the poll interval finds
        rows other processes write."""
        await trio.sleep_forever()

    # -- reading

    async def get(self, row_id: str) -> OutboxRow | None:
        def op(conn: sqlite3.Connection) -> OutboxRow | None:
            found = conn.execute(_SELECT + " WHERE id = ?", (row_id,)).fetchone()
            return None if found is None else row_from_values(found)

        return await self._read(op)

    async def get_by_client_id(self, client_message_id: str) -> OutboxRow | None:
        def op(conn: sqlite3.Connection) -> OutboxRow | None:
            found = conn.execute(_SELECT + " WHERE client_message_id = ?", (client_message_id,)).fetchone()
            return None if found is None else row_from_values(found)

        return await self._read(op)

    async def list(self, *, status: Status | None, limit: int, before: int | None = None) -> Rows:
        sql, args = list_query(_SELECT, status=status, before=before, mark="?")

        def op(conn: sqlite3.Connection) -> Rows:
            return [row_from_values(r) for r in conn.execute(sql, [*args, limit])]

        return await self._read(op)

    async def counts(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            counts = dict.fromkeys((s.value for s in Status), 0)
            for status, n in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
                counts[status] = n
            return counts

        return await self._read(op)

    # -- operator actions

    def _locked_row(self, conn: sqlite3.Connection, row_id: str) -> OutboxRow:
        found = conn.execute(_SELECT + " WHERE id = ?", (row_id,)).fetchone()
        if found is None:
            raise UnknownRow(f"no outbox row has id {row_id!r}")
        return row_from_values(found)

    async def requeue(
        self, row_id: str, *, now: int, new_id: str, new_client_message_id: str, by: str
    ) -> OutboxRow:
        def op(conn: sqlite3.Connection) -> OutboxRow:
            aborted, successor = _lifecycle.requeued(
                self._locked_row(conn, row_id),
                now=now,
                new_id=new_id,
                new_client_message_id=new_client_message_id,
                by=by,
            )
            conn.execute(_INSERT, row_values(successor))
            write_aborted(conn, aborted, mark="?")
            return successor

        return await self._write(op)

    async def drop(self, row_id: str, *, now: int, by: str) -> OutboxRow:
        def op(conn: sqlite3.Connection) -> OutboxRow:
            aborted = _lifecycle.dropped(self._locked_row(conn, row_id), now=now, by=by)
            write_aborted(conn, aborted, mark="?")
            return aborted

        return await self._write(op)

    async def prune(self, *, delivered_before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM outbox WHERE status = 'done' AND delivered_at < ?",
                (delivered_before,),
            ).rowcount

        return await self._write(op)


# -- opening, checking, migrating -------------------------------------------------------


def _connect(path: Path, durability: Durability) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise StoreError(f"{path}: cannot switch to WAL journal mode (got {mode})")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    return conn


def _check_integrity(path: Path) -> None:
    """Refuse a corrupt file, reading it without writing a byte."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        raise CorruptDatabase(f"{path} is not a usable SQLite database: {exc}") from None
    finally:
        conn.close()
    if result != ["ok"]:
        raise CorruptDatabase(f"{path} failed its integrity check: {'; '.join(result[:3])}")


def _migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema in one transaction.

    The version lives in its own table rather than `PRAGMA user_version`,
    which the seed's daemon may use for its other tables.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        if version < 1:
            conn.execute(_CREATE_TABLE)
            present = {r[1] for r in conn.execute("PRAGMA table_xinfo(outbox)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    conn.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
            if "priority_rank" not in present:
                conn.execute(_ADD_PRIORITY_RANK)
            for statement in INDEXES:
                conn.execute(statement)
            record_schema_version(conn, mark="?")
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise
