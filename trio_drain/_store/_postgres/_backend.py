"""The PostgreSQL back end: one outbox shared by drain processes on many hosts.

psycopg's async API does not run on Trio, so this uses sync psycopg 3
connections in worker threads: a small pool (`pool_size` connections,
opened lazily), each connection used by one thread at a time, never
abandoned on cancellation. A connection that fails is closed and replaced
on next use, so a restarted server costs the callers that were in flight
one `StoreUnavailable` each and nothing more.

Concurrency is PostgreSQL's: claims pick rows with `FOR UPDATE SKIP LOCKED`
(so workers on many hosts never claim one row twice), accepts serialise on
the unique `client_message_id` (`INSERT ... ON CONFLICT DO NOTHING`, then
read whoever won), and sweeps skip rows another transaction holds, so no
two statements here can deadlock. Commits of concurrent accepts share WAL
flushes inside the server, which is PostgreSQL's own group commit.

Clocks: every time that decides something (due times, lease expiry,
max_age) is the database server's, `statement_timestamp()` in
milliseconds, so hosts whose clocks disagree share one timeline: a host
running fast takes no live lease, one running slow holds nothing back. The
`now` the worker's calls carry is used only to translate: a completion's
retry time (the host's now + backoff) is moved onto the server's timeline,
and `next_due_at` answers on the caller's.

Lost commit acknowledgements: the worker's writes (claims and outcomes)
note their transaction id; when the connection drops after COMMIT was
sent, a new connection asks the server (`txid_status`) whether it
committed, so the caller gets the rows it claimed and the outcomes it
applied rather than an error that would strand the rows until their lease
ran out.

Wakeups: an accept that inserts a row issues `NOTIFY trio_drain_outbox`
in its transaction; `watch` holds one extra connection in `LISTEN` and
waits on its socket from Trio directly (no thread), reconnecting with
backoff. Notifications can be lost (a reconnect, a pooler in transaction
mode), so the worker keeps its poll interval as the backstop.
"""

from __future__ import annotations

import logging
import operator
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
import psycopg
import psycopg.conninfo
import psycopg.errors
import trio

from ... import _lifecycle
from ..._errors import ConfigError, StoreClosed, StoreError, StoreUnavailable, UnknownRow
from ..._lifecycle import Completion, UnknownFate
from ..._model import NewRow, OutboxRow, Status
from .._base import (
    COLUMNS,
    INDEXES,
    NO_FILTER,
    Applied,
    Durability,
    Outcomes,
    RouteFilter,
    Rows,
    check_durability,
    in_claim_order,
    list_query,
    new_row_values,
    only_route_clause,
    record_schema_version,
    row_from_values,
    row_values,
    schema_version,
    write_aborted,
)

T = TypeVar("T")
log = logging.getLogger("trio_drain.postgres")

CHANNEL = "trio_drain_outbox"
# Any constant: serialises schema migrations of processes starting together.
_MIGRATION_LOCK = 0x7472696F647261  # "triodra"

_COLUMN_TYPES: dict[str, str] = {
    "id": "text",
    "client_message_id": "text",
    "request_fingerprint": "bytea",
    "payload": "bytea",
    "enqueued_at": "bigint",
    "attempts": "integer",
    "next_attempt_at": "bigint",
    "status": "text",
    "last_error": "text",
    "delivered_at": "bigint",
    "broker_message_id": "text",
    "aborted_at": "bigint",
    "aborted_by": "text",
    "superseded_by": "text",
    "mesh": "text",
    "target_spec": "text",
    "nonce": "text",
    "ciphertext": "text",
    "priority": "text",
    "sender_session_pubkey": "text",
    "lease_expires_at": "bigint",
    "lease_token": "text",
}
assert tuple(_COLUMN_TYPES) == COLUMNS

_COLS = ", ".join(COLUMNS)
_SELECT = f"SELECT {_COLS} FROM outbox"
_RETURNING = ", ".join("outbox." + c for c in COLUMNS)

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id                    TEXT PRIMARY KEY,
    client_message_id     TEXT NOT NULL UNIQUE,
    request_fingerprint   BYTEA NOT NULL,
    payload               BYTEA NOT NULL,
    enqueued_at           BIGINT NOT NULL,
    attempts              INTEGER NOT NULL DEFAULT 0,
    next_attempt_at       BIGINT NOT NULL,
    status                TEXT NOT NULL
        CHECK (status IN ('pending', 'inflight', 'done', 'dead', 'aborted')),
    last_error            TEXT,
    delivered_at          BIGINT,
    broker_message_id     TEXT,
    aborted_at            BIGINT,
    aborted_by            TEXT,
    superseded_by         TEXT,
    mesh                  TEXT,
    target_spec           TEXT,
    nonce                 TEXT,
    ciphertext            TEXT,
    priority              TEXT,
    sender_session_pubkey TEXT,
    lease_expires_at      BIGINT,
    lease_token           TEXT,
    priority_rank         SMALLINT GENERATED ALWAYS AS
        (CASE priority WHEN 'now' THEN 0 WHEN 'low' THEN 2 ELSE 1 END) STORED
)
"""

#: The database server's clock in milliseconds since the epoch: what every
#: time-based decision on PostgreSQL reads. `statement_timestamp()` rather
#: than `clock_timestamp()`: it is stable (one value for every row a
#: statement touches, and usable as an index bound, where the volatile
#: clock_timestamp() is neither) and it is taken afresh for each statement
#: (unlike now(), the transaction's start, which in complete_and_claim would
#: be older than the claim it dates). `date_part` (float8) rather than
#: `extract` (numeric since PostgreSQL 14): it is evaluated per row, and
#: numeric arithmetic costs several times more. Not an uncorrelated
#: subquery (an InitPlan, evaluated once): the planner cannot estimate a
#: bound it does not see, and then claims by the due index and a sort.
SERVER_NOW = "floor(date_part('epoch', statement_timestamp()) * 1000)::bigint"

#: The oldest PostgreSQL this SQL runs on: stored generated columns
#: (priority_rank) came in 12; txid_status (lost commits) in 10; FOR UPDATE
#: SKIP LOCKED and ON CONFLICT in 9.5.
MIN_POSTGRES = 120000

# Columns a new row's insert binds; the two times are the server's.
_STAMPED = ("enqueued_at", "next_attempt_at")
_BOUND = tuple(c for c in COLUMNS if c not in _STAMPED)
_BOUND_AT = [COLUMNS.index(c) for c in _BOUND]

# One statement inserts a whole batch: a column of values per array.
_INSERT = (
    f"INSERT INTO outbox ({_COLS}) SELECT "
    + ", ".join(SERVER_NOW if c in _STAMPED else f"u.{c}" for c in COLUMNS)
    + " FROM unnest("
    + ", ".join(f"%s::{_COLUMN_TYPES[c]}[]" for c in _BOUND)
    + ")"
    + " AS u("
    + ", ".join(_BOUND)
    + ")"
    + " ON CONFLICT (client_message_id) DO NOTHING RETURNING client_message_id, enqueued_at"
)

_STATUS_AT = _BOUND.index("status")


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows' values (in `COLUMNS` order) as one list per bound column (the
    server stamps the times), Status bound as its text."""
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]
    bound = [columns[at] for at in _BOUND_AT]
    bound[_STATUS_AT] = [str(s) for s in bound[_STATUS_AT]]
    return bound


def version_text(number: int) -> str:
    """PostgreSQL's server_version_num as people write it (120000 is 12.0)."""
    if number >= 100000:
        return f"{number // 10000}.{number % 10000}"
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def describe(dsn: str) -> str:
    """host:port/dbname of a connection string, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"postgresql://{host}:{port}/{info.get('dbname') or ''}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _translate(exc: psycopg.Error, where: str) -> StoreError:
    text = _first_line(exc)
    if isinstance(
        exc, (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
    ):
        return StoreUnavailable(f"the PostgreSQL outbox at {where} is unavailable: {text}")
    return StoreError(f"PostgreSQL outbox error at {where}: {text}")


def _route_clause(exclude: RouteFilter) -> tuple[str, list[Any]]:
    """SQL leaving out rows of blocked routes (mirrors RouteFilter.blocks)."""
    parts: list[str] = []
    params: list[Any] = []
    if exclude.sessions:
        parts.append("(sender_session_pubkey IS NULL OR sender_session_pubkey <> ALL(%s::text[]))")
        params.append(sorted(exclude.sessions))
    if exclude.meshes:
        parts.append("(sender_session_pubkey IS NOT NULL OR mesh IS NULL OR mesh <> ALL(%s::text[]))")
        params.append(sorted(exclude.meshes))
    if exclude.null_mesh:
        parts.append("(sender_session_pubkey IS NOT NULL OR mesh IS NOT NULL)")
    clause = "".join(" AND " + p for p in parts)
    if exclude.only is not None:
        only, only_params = only_route_clause(exclude.only, "%s")
        clause += only
        params.extend(only_params)
    return clause, params


# -- connections -------------------------------------------------------------------

#: How long to wait for a transaction whose COMMIT went unanswered to end
#: (its old session has not noticed the dropped connection yet) before
#: giving up; after `_SETTLE_PATIENCE` that session is ended.
_SETTLE_TIMEOUT = 5.0
_SETTLE_PATIENCE = 0.2


@attrs.define(eq=False)
class Commit:
    """A transaction of the worker's (a claim or outcomes), followed so that
    a COMMIT whose answer is lost can be settled.

    Attributes:
        xid: its transaction id (`txid_current()`), set by its statements
            once it has changed a row; None while it has changed nothing.
        pid: the server process of the connection that ran it.
        value: what it returned, had it committed.
        unsettled: its COMMIT went unanswered and nobody could tell yet
            whether it was applied.
    """

    xid: int | None = None
    pid: int | None = None
    value: Any = None
    unsettled: bool = False


def committed(conn: psycopg.Connection[Any], commit: Commit) -> bool:
    """Whether transaction `commit.xid` committed (False: it rolled back).

    While it is still in progress (its session has not noticed that its
    client is gone), waits; after a moment ends that session, which settles
    it either way. Raises StoreUnavailable if it is still open after
    `_SETTLE_TIMEOUT`.
    """
    assert commit.xid is not None
    start = time.monotonic()
    delay = 0.002
    ended = False
    while True:
        try:
            with conn.transaction():  # (a savepoint, when called inside a transaction)
                status = conn.execute("SELECT txid_status(%s)", (commit.xid,)).fetchone()
        except psycopg.errors.InvalidParameterValue:
            # "in the future": the server lost the end of its WAL in a crash
            # (commits without a WAL flush), and the transaction with it.
            return False
        if status is None or status[0] is None:
            raise StoreUnavailable(f"cannot tell whether transaction {commit.xid} committed")
        if status[0] == "committed":
            return True
        if status[0] == "aborted":
            return False
        elapsed = time.monotonic() - start
        if elapsed >= _SETTLE_TIMEOUT:
            raise StoreUnavailable(
                f"transaction {commit.xid} is still in progress {elapsed:.1f}s after its connection"
                " dropped; its rows stay as they are until their lease expires"
            )
        if not ended and elapsed >= _SETTLE_PATIENCE and commit.pid is not None:
            ended = True
            try:  # only that session, and only while it still runs that transaction
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = %s AND backend_xid::text = %s",
                        (commit.pid, str(commit.xid % 2**32)),
                    )
            except psycopg.errors.InsufficientPrivilege:
                pass  # wait for it to notice on its own
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class _Pool:
    """Up to `size` connections, each used by one thread at a time.

    Connections open lazily and are thrown away when they fail, so the next
    caller reconnects: a server restart needs no special handling.
    """

    def __init__(self, dsn: str, *, size: int, durability: Durability) -> None:
        self.dsn = dsn
        self.where = describe(dsn)
        self.durability = durability
        self._idle: list[psycopg.Connection[Any]] = []
        self._limiter = trio.CapacityLimiter(size)
        self._lost = False  # a connection failed and none has worked since
        self.closed = False

    def connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection (blocking: call from a thread)."""
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=5,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                application_name="trio-drain",
            )
        except psycopg.Error as exc:
            raise _translate(exc, self.where) from None
        if self.durability == "normal":
            conn.execute("SET synchronous_commit = off")
        return conn

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T], commit: Commit | None = None) -> T:
        """Run `fn` in one transaction on a pooled connection, in a thread.

        With `commit`, whose `xid` `fn` sets from its statements, a COMMIT
        whose answer is lost to a dropped connection is settled: a new
        connection asks the server what became of the transaction, and the
        caller gets `fn`'s value if it committed (StoreUnavailable, with
        nothing changed, if it rolled back; StoreUnavailable with
        `commit.unsettled` set if the server cannot be asked).
        """
        if self.closed:
            raise StoreClosed("the outbox is closed")
        async with self._limiter:
            box = [self._idle.pop() if self._idle else None]
            try:
                result = await trio.to_thread.run_sync(self._run_sync, box, fn, commit)
            finally:
                if box[0] is not None:
                    self._idle.append(box[0])
        if self._lost:
            self._lost = False
            log.warning("PostgreSQL outbox at %s is reachable again", self.where)
        return result

    def _run_sync(
        self,
        box: list[psycopg.Connection[Any] | None],
        fn: Callable[[psycopg.Connection[Any]], T],
        commit: Commit | None,
    ) -> T:
        conn = box[0]
        committing = False
        try:
            if conn is None:
                conn = box[0] = self.connect()
            if commit is not None:
                commit.pid = conn.info.backend_pid
            with conn.transaction():
                value = fn(conn)
                committing = True  # only COMMIT is left
            return value
        except psycopg.Error as exc:
            if conn is not None and (conn.broken or isinstance(exc, psycopg.OperationalError)):
                box[0] = None
                conn.close()
                if not self._lost:
                    self._lost = True
                    log.warning(
                        "lost a connection to the PostgreSQL outbox at %s (%s); reconnecting on next use",
                        self.where,
                        _first_line(exc),
                    )
            if (
                committing
                and commit is not None
                and commit.xid is not None
                and isinstance(exc, psycopg.OperationalError)
            ):
                # COMMIT went unanswered: it may have been applied. Find out.
                commit.value = value
                if self._committed(box, commit):
                    return value
                raise StoreUnavailable(
                    f"the PostgreSQL outbox at {self.where} lost the connection at commit; the"
                    " transaction rolled back and changed nothing"
                ) from None
            raise _translate(exc, self.where) from None
        except StoreUnavailable:
            self._lost = True
            raise

    def _committed(self, box: list[psycopg.Connection[Any] | None], commit: Commit) -> bool:
        """Whether the transaction `commit.xid` committed, asked on a new
        connection (left in `box`). Raises StoreUnavailable, marking
        `commit.unsettled`, when that cannot be told."""
        try:
            conn = box[0] = self.connect()
            return committed(conn, commit)
        except StoreUnavailable:
            commit.unsettled = True
            raise
        except psycopg.Error as exc:
            commit.unsettled = True
            if box[0] is not None:
                box[0].close()
                box[0] = None
            raise _translate(exc, self.where) from None

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.move_on_after(30, shield=True):
            # Take every slot: statements in progress finish first (they are
            # never abandoned), and no new one starts.
            for _ in range(int(self._limiter.total_tokens)):
                await self._limiter.acquire_on_behalf_of(object())
            idle, self._idle = self._idle, []

            def close() -> None:
                for conn in idle:
                    conn.close()

            await trio.to_thread.run_sync(close)


# -- the back end ------------------------------------------------------------------


def _claim_statement(
    limit: int, lease_ms: int, max_age_ms: int, token: str, exclude: RouteFilter
) -> tuple[str, list[Any]]:
    """The claim, due-ness, age and lease all by the server's clock. The
    transaction id comes back between the columns and the rank (the last
    value, which `in_claim_order` sorts by)."""
    clause, params = _route_clause(exclude)
    sql = (
        "WITH picked AS (SELECT id FROM outbox"
        f" WHERE status = 'pending' AND next_attempt_at <= {SERVER_NOW}"
        f" AND enqueued_at >= {SERVER_NOW} - %s"
        + clause
        + " ORDER BY priority_rank, enqueued_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        " UPDATE outbox SET status = 'inflight', attempts = outbox.attempts + 1,"
        f" lease_token = %s, lease_expires_at = {SERVER_NOW} + %s FROM picked WHERE outbox.id = picked.id"
        f" RETURNING {_RETURNING}, txid_current(), outbox.priority_rank"
    )
    return sql, [max_age_ms, *params, limit, token, lease_ms]


_XID_AT = len(COLUMNS)  # where a claimed row's transaction id is


def _claim(conn: psycopg.Connection[Any], sql: str, args: list[Any], commit: Commit | None) -> Rows:
    found = conn.execute(sql, args).fetchall()
    if found and commit is not None:
        commit.xid = found[0][_XID_AT]
    return in_claim_order(found)


# One statement for the whole batch; the fence is in the join. A pending
# row's retry time is the host's (its now + backoff): it is moved onto the
# server's timeline by the host's offset, `SERVER_NOW - host_now` when the
# caller's now is known (first parameter), else the last offset measured
# (second). A completion that carries its delay (`retry_in_ms`) is simply
# due that long after the server's now.
_COMPLETE = (
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


def _complete(
    conn: psycopg.Connection[Any],
    sql: str,
    completions: Sequence[Completion],
    *,
    host_now: int | None,
    offset: int,
    commit: Commit | None,
) -> Applied:
    """Apply completions (`sql` is `_COMPLETE`); `host_now` is the caller's
    clock now, or None to use `offset` (server minus host) instead."""
    # Losing an outcome to a server crash is harmless (the lease brings the
    # row back and the broker dedupes the resend), so these commits do not
    # wait for the WAL flush.
    conn.execute("SET LOCAL synchronous_commit = off")
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
    if found and commit is not None:
        commit.xid = found[0][2]
    applied = {(r[0], r[1]) for r in found}
    return [(c.row_id, c.lease_token) in applied for c in completions]


# Rows a claim took, read back by its lease token, in claim order.
_HELD = f"SELECT {_COLS}, outbox.priority_rank FROM outbox WHERE status = 'inflight' AND lease_token = %s"
# Only `sent=False` of `on_released` is used, which reads no policy field.
_GIVE_BACK_POLICY = _lifecycle.RetryPolicy()
# Outcome writes whose commit went unanswered and could not be settled, kept
# for the caller's retry (the completer retries with the same completions).
_MAX_LOST = 16

OutcomeKey = tuple[tuple[str, str], ...]


def _outcome_key(completions: Sequence[Completion]) -> OutcomeKey:
    return tuple((c.row_id, c.lease_token) for c in completions)


@attrs.define(eq=False)
class _LostWrite:
    """An outcome write (complete or complete_and_claim) whose COMMIT went
    unanswered, not yet settled."""

    commit: Commit
    applied: Applied  # its answer, had it committed
    token: str | None  # its claim's lease token, if it claimed rows


class PostgresBackend:
    """An outbox in a PostgreSQL database. Build it with `PostgresBackend.open`.

    Times: due-ness, lease expiry and max_age are judged by the server's
    clock; the `now` arguments of the worker's calls do not decide them (see
    each method).
    """

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.where = pool.where
        self.listen_reconnect = (0.1, 5.0)  # backoff of the LISTEN connection, seconds
        #: Whether `watch` holds a live LISTEN connection right now.
        self.listening = False
        #: Tests only: a stand-in for the server's clock (ms), so that a fake
        #: clock can move leases and due times; None (the default) uses the
        #: server's own.
        self.server_clock: Callable[[], int] | None = None
        # The server's clock minus the caller's, as last measured (None: not yet).
        self._offset: int | None = None
        self._lost_writes: dict[OutcomeKey, _LostWrite] = {}

    @classmethod
    async def open(cls, dsn: str, *, durability: Durability = "full", pool_size: int = 8) -> PostgresBackend:
        check_durability(durability)
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"malformed PostgreSQL URL: {exc}") from None
        pool = _Pool(dsn, size=pool_size, durability=durability)
        try:
            await pool.run(_migrate)
        except BaseException:
            await pool.aclose()
            raise
        return cls(pool)

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _sql(self, sql: str) -> str:
        """`sql` with the server's clock, or with `server_clock`'s reading."""
        clock = self.server_clock
        return sql if clock is None else sql.replace(SERVER_NOW, f"{int(clock())}::bigint")

    def _measured(self, host_now: int, server_now: int) -> None:
        self._offset = server_now - host_now

    # -- accept

    async def accept_many(self, rows: Sequence[NewRow]) -> Outcomes:
        """Insert new rows; enqueued_at and next_attempt_at are the server's
        now (the rows' own, from the caller's clock, are not stored)."""
        # The first row of each client_message_id is offered for insert; a
        # repeat later in the batch is decided against it, like any other
        # existing row. ON CONFLICT waits for a concurrent insert of the
        # same id to commit or roll back, so exactly one of them wins and
        # the others read the winner's row.
        first_of: dict[str, NewRow] = {}
        for r in rows:
            first_of.setdefault(r.client_message_id, r)
        firsts = list(first_of.values())
        insert = self._sql(_INSERT)

        def op(conn: psycopg.Connection[Any]) -> Outcomes:
            inserted = {
                r[0] for r in conn.execute(insert, _columns([new_row_values(r) for r in firsts])).fetchall()
            }
            existing: dict[str, OutboxRow] = {}
            others = [r.client_message_id for r in firsts if r.client_message_id not in inserted]
            if others:
                for found in conn.execute(_SELECT + " WHERE client_message_id = ANY(%s::text[])", (others,)):
                    prior = row_from_values(found)
                    existing[prior.client_message_id] = prior
                missing = set(others) - set(existing)
                if missing:  # deleted between the conflict and the read (a prune)
                    raise StoreUnavailable(f"rows {sorted(missing)[:3]} vanished during accept; retry")
            outcomes = []
            for row in rows:
                cid = row.client_message_id
                # None only for the first row of an id this statement inserted.
                outcome = _lifecycle.decide_accept(
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

        return await self._pool.run(op)

    # -- the worker's side

    def _claimed(self, rows: Rows, *, now: int, lease_ms: int) -> Rows:
        if rows:
            lease_expires_at = rows[0].lease_expires_at
            assert lease_expires_at is not None
            self._measured(now, lease_expires_at - lease_ms)
        return rows

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
        """Claim by the server's clock: `now` decides nothing (it only
        measures the caller's clock against the server's)."""
        sql, args = _claim_statement(limit, lease_ms, max_age_ms, token, exclude)
        sql = self._sql(sql)
        commit = Commit()

        def op(conn: psycopg.Connection[Any]) -> Rows:
            return _claim(conn, sql, args, commit)

        return self._claimed(await self._pool.run(op, commit), now=now, lease_ms=lease_ms)

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        """Apply completions. A pending row's retry time, the caller's now
        plus a delay, is moved onto the server's clock by the offset last
        measured between the two."""
        recovered = await self._settle_lost_write(completions)
        if recovered is not None:
            applied, rows = recovered
            if rows:  # it claimed rows this call cannot hand over: give them back
                await self._give_back(rows)
            return applied
        sql = self._sql(_COMPLETE)
        offset = self._offset or 0
        commit = Commit()

        def op(conn: psycopg.Connection[Any]) -> Applied:
            return _complete(conn, sql, completions, host_now=None, offset=offset, commit=commit)

        try:
            return await self._pool.run(op, commit)
        except StoreUnavailable:
            if commit.unsettled:
                self._remember(completions, commit, applied=commit.value, token=None)
            raise

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
        """`complete` then `claim`, in one transaction. `now` decides
        nothing: it moves pending retry times onto the server's clock."""
        recovered = await self._settle_lost_write(completions)
        if recovered is not None:
            applied, rows = recovered
            if len(rows) > limit:
                await self._give_back(rows[limit:])
                rows = rows[:limit]
            elif not rows and limit:  # it claimed nothing: claim now
                rows = await self.claim(
                    now=now,
                    limit=limit,
                    lease_ms=lease_ms,
                    max_age_ms=max_age_ms,
                    token=token,
                    exclude=exclude,
                )
            return applied, rows
        claim_sql, claim_args = _claim_statement(limit, lease_ms, max_age_ms, token, exclude)
        claim_sql, complete_sql = self._sql(claim_sql), self._sql(_COMPLETE)
        commit = Commit()

        def op(conn: psycopg.Connection[Any]) -> tuple[Applied, Rows]:
            applied = _complete(conn, complete_sql, completions, host_now=now, offset=0, commit=commit)
            return applied, _claim(conn, claim_sql, claim_args, commit)

        try:
            applied, rows = await self._pool.run(op, commit)
        except StoreUnavailable:
            if commit.unsettled:
                lost_applied, lost_rows = commit.value
                self._remember(completions, commit, applied=lost_applied, token=token if lost_rows else None)
            raise
        return applied, self._claimed(rows, now=now, lease_ms=lease_ms)

    def _remember(
        self, completions: Sequence[Completion], commit: Commit, *, applied: Applied, token: str | None
    ) -> None:
        """Keep an outcome write whose commit went unanswered for the retry."""
        while len(self._lost_writes) >= _MAX_LOST:
            del self._lost_writes[next(iter(self._lost_writes))]
        self._lost_writes[_outcome_key(completions)] = _LostWrite(commit, applied, token)

    async def _settle_lost_write(self, completions: Sequence[Completion]) -> tuple[Applied, Rows] | None:
        """If an earlier write of these same completions went unanswered at
        commit and is still unsettled, find out what it did: its answer and
        the rows it claimed that are still held under its lease, if it
        committed; None if it did not (write them afresh)."""
        if not self._lost_writes:
            return None
        key = _outcome_key(completions)
        lost = self._lost_writes.pop(key, None)
        if lost is None:
            return None

        def op(conn: psycopg.Connection[Any]) -> tuple[bool, Rows]:
            if not committed(conn, lost.commit):
                return False, []
            if lost.token is None:
                return True, []
            return True, in_claim_order(conn.execute(_HELD, (lost.token,)).fetchall())

        try:
            done, rows = await self._pool.run(op)
        except StoreUnavailable:
            self._lost_writes[key] = lost
            raise
        if not done:
            return None
        log.info(
            "an outcome write whose commit went unanswered was applied; %d row(s) it claimed are still held",
            len(rows),
        )
        return lost.applied, rows

    async def _give_back(self, rows: Rows) -> None:
        """Hand claimed rows nobody will send back to pending, due at once,
        their attempt given back (`on_released` before a send)."""
        # `on_released` puts the rows due at its `now`; 0 here, with a host
        # now of 0, is the server's now.
        completions = [_lifecycle.on_released(r, sent=False, now=0, policy=_GIVE_BACK_POLICY) for r in rows]
        sql = self._sql(_COMPLETE)

        def op(conn: psycopg.Connection[Any]) -> Applied:
            return _complete(conn, sql, completions, host_now=0, offset=0, commit=None)

        await self._pool.run(op)

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        """Leases expire by the server's clock (`now` is ignored); a row put
        back is due at the server's now."""
        # The state machine's two answers, at the attempt cap and below it.
        cap_status, cap_error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=True)
        status, error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=False)

        def due(to: Status) -> str:  # a row put back is due at once
            return SERVER_NOW if to is Status.PENDING else "outbox.next_attempt_at"

        sql = self._sql(
            "WITH expired AS (SELECT id FROM outbox WHERE status = 'inflight'"
            f" AND (lease_expires_at IS NULL OR lease_expires_at <= {SERVER_NOW}) FOR UPDATE SKIP LOCKED),"
            " fate AS (SELECT outbox.id, outbox.attempts >= %(cap)s AS at_cap FROM outbox"
            "  JOIN expired ON outbox.id = expired.id)"
            " UPDATE outbox SET"
            " status = CASE WHEN fate.at_cap THEN %(cap_status)s ELSE %(status)s END,"
            " last_error = CASE WHEN fate.at_cap THEN %(cap_error)s ELSE %(error)s END,"
            f" next_attempt_at = CASE WHEN fate.at_cap THEN {due(cap_status)} ELSE {due(status)} END,"
            " lease_token = NULL, lease_expires_at = NULL FROM fate WHERE outbox.id = fate.id"
        )
        args = {
            "cap": max_attempts,
            "cap_status": cap_status.value,
            "cap_error": cap_error,
            "status": status.value,
            "error": error,
        }

        def op(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(sql, args).rowcount

        return await self._pool.run(op)

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        """Age by the server's clock (`now` is ignored)."""
        sql = self._sql(
            "UPDATE outbox SET status = 'dead', last_error = %s WHERE id IN (SELECT id FROM outbox"
            f" WHERE status = 'pending' AND enqueued_at < {SERVER_NOW} - %s FOR UPDATE SKIP LOCKED)"
        )

        def op(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(sql, (_lifecycle.EXPIRED, max_age_ms)).rowcount

        return await self._pool.run(op)

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        """The next due time on the caller's clock: `now` plus how far in the
        server's future the row is due (so a caller whose clock is off
        sleeps the right time); age by the server's clock."""
        clause, params = _route_clause(exclude)
        sql = self._sql(
            "SELECT (SELECT next_attempt_at FROM outbox WHERE status = 'pending'"
            f" AND enqueued_at >= {SERVER_NOW} - %s"
            + clause
            + f" ORDER BY next_attempt_at LIMIT 1), {SERVER_NOW}"
        )

        def op(conn: psycopg.Connection[Any]) -> tuple[int | None, int]:
            found = conn.execute(sql, [max_age_ms, *params]).fetchone()
            assert found is not None
            return found[0], int(found[1])

        due, server_now = await self._pool.run(op)
        self._measured(now, server_now)
        return None if due is None else now + (int(due) - server_now)

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """LISTEN for accepts in other processes and call `wake` for each burst.

        Runs until cancelled. Waits on the connection's socket from Trio, so
        no thread is tied up; a lost connection is reopened with backoff, and
        `wake` is called after every (re)connect since notifications sent
        while disconnected are gone.
        """
        low, high = self.listen_reconnect
        delay = low
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = await trio.to_thread.run_sync(self._listen_connect)
                delay = low
                self.listening = True
                wake()
                pgconn = conn.pgconn
                while True:
                    await trio.lowlevel.wait_readable(conn.fileno())
                    pgconn.consume_input()
                    heard = False
                    while pgconn.notifies() is not None:
                        heard = True
                    if heard:
                        wake()
                    if pgconn.status != psycopg.pq.ConnStatus.OK:
                        raise psycopg.OperationalError("the LISTEN connection closed")
            except (psycopg.Error, StoreUnavailable, OSError) as exc:
                log.warning(
                    "LISTEN connection to %s lost (%s); reconnecting in %.1fs",
                    self.where,
                    _first_line(exc),
                    delay,
                )
            finally:
                self.listening = False
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.close)
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, high)

    def _listen_connect(self) -> psycopg.Connection[Any]:
        conn = self._pool.connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            conn.close()
            raise _translate(exc, self.where) from None
        return conn

    # -- reading

    async def get(self, row_id: str) -> OutboxRow | None:
        def op(conn: psycopg.Connection[Any]) -> OutboxRow | None:
            found = conn.execute(_SELECT + " WHERE id = %s", (row_id,)).fetchone()
            return None if found is None else row_from_values(found)

        return await self._pool.run(op)

    async def get_by_client_id(self, client_message_id: str) -> OutboxRow | None:
        def op(conn: psycopg.Connection[Any]) -> OutboxRow | None:
            found = conn.execute(_SELECT + " WHERE client_message_id = %s", (client_message_id,)).fetchone()
            return None if found is None else row_from_values(found)

        return await self._pool.run(op)

    async def list(self, *, status: Status | None, limit: int, before: int | None = None) -> Rows:
        sql, args = list_query(_SELECT, status=status, before=before, mark="%s")

        def op(conn: psycopg.Connection[Any]) -> Rows:
            return [row_from_values(r) for r in conn.execute(sql, [*args, limit])]

        return await self._pool.run(op)

    async def counts(self) -> dict[str, int]:
        def op(conn: psycopg.Connection[Any]) -> dict[str, int]:
            counts = dict.fromkeys((s.value for s in Status), 0)
            for status, n in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
                counts[status] = int(n)
            return counts

        return await self._pool.run(op)

    # -- operator actions

    async def requeue(
        self, row_id: str, *, now: int, new_id: str, new_client_message_id: str, by: str
    ) -> OutboxRow:
        """The successor is enqueued (and due) at the server's now."""
        insert = self._sql(_INSERT)

        def op(conn: psycopg.Connection[Any]) -> OutboxRow:
            aborted, successor = _lifecycle.requeued(
                _locked_row(conn, row_id),
                now=now,
                new_id=new_id,
                new_client_message_id=new_client_message_id,
                by=by,
            )
            found = conn.execute(insert, _columns([row_values(successor)])).fetchone()
            assert found is not None  # a fresh client_message_id
            write_aborted(conn, aborted, mark="%s")
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            return attrs.evolve(successor, enqueued_at=found[1], next_attempt_at=found[1])

        return await self._pool.run(op)

    async def drop(self, row_id: str, *, now: int, by: str) -> OutboxRow:
        def op(conn: psycopg.Connection[Any]) -> OutboxRow:
            aborted = _lifecycle.dropped(_locked_row(conn, row_id), now=now, by=by)
            write_aborted(conn, aborted, mark="%s")
            return aborted

        return await self._pool.run(op)

    async def prune(self, *, delivered_before: int) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(
                "DELETE FROM outbox WHERE status = 'done' AND delivered_at < %s", (delivered_before,)
            ).rowcount

        return await self._pool.run(op)


def _locked_row(conn: psycopg.Connection[Any], row_id: str) -> OutboxRow:
    found = conn.execute(_SELECT + " WHERE id = %s FOR UPDATE", (row_id,)).fetchone()
    if found is None:
        raise UnknownRow(f"no outbox row has id {row_id!r}")
    return row_from_values(found)


def check_server_version(conn: psycopg.Connection[Any]) -> None:
    """Refuse a server too old for the outbox's SQL."""
    found = conn.info.server_version
    if found < MIN_POSTGRES:
        raise StoreError(
            f"the PostgreSQL server is version {version_text(found)}; trio-drain needs"
            f" {version_text(MIN_POSTGRES)} or newer (stored generated columns)"
        )


def _migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the schema; processes starting together take turns."""
    check_server_version(conn)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    version = schema_version(conn)
    if version < 1:
        conn.execute(_CREATE_TABLE)
        for statement in INDEXES:
            conn.execute(statement)
        record_schema_version(conn, mark="%s")
