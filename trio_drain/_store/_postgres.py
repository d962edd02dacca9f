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

Wakeups: an accept that inserts a row issues `NOTIFY trio_drain_outbox`
in its transaction; `watch` holds one extra connection in `LISTEN` and
waits on its socket from Trio directly (no thread), reconnecting with
backoff. Notifications can be lost (a reconnect, a pooler in transaction
mode), so the worker keeps its poll interval as the backstop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import trio

from .. import _lifecycle
from .._errors import ConfigError, StoreClosed, StoreError, StoreUnavailable, UnknownRow
from .._lifecycle import Completion, UnknownFate
from .._model import NewRow, OutboxRow, Status
from ._base import (
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
    "id": "text", "client_message_id": "text", "request_fingerprint": "bytea",
    "payload": "bytea", "enqueued_at": "bigint", "attempts": "integer",
    "next_attempt_at": "bigint", "status": "text", "last_error": "text",
    "delivered_at": "bigint", "broker_message_id": "text", "aborted_at": "bigint",
    "aborted_by": "text", "superseded_by": "text", "mesh": "text", "target_spec": "text",
    "nonce": "text", "ciphertext": "text", "priority": "text",
    "sender_session_pubkey": "text", "lease_expires_at": "bigint", "lease_token": "text",
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

# One statement inserts a whole batch: a column of values per array.
_INSERT = (
    f"INSERT INTO outbox ({_COLS}) SELECT * FROM unnest("
    + ", ".join(f"%s::{t}[]" for t in _COLUMN_TYPES.values())
    + ") ON CONFLICT (client_message_id) DO NOTHING RETURNING client_message_id"
)

_STATUS_AT = COLUMNS.index("status")


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows' values (in `COLUMNS` order) as one list per column, Status bound as its text."""
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]
    columns[_STATUS_AT] = [str(s) for s in columns[_STATUS_AT]]
    return columns


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
    if isinstance(exc, (psycopg.OperationalError, psycopg.errors.SerializationFailure,
                        psycopg.errors.DeadlockDetected)):
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
        parts.append(
            "(sender_session_pubkey IS NOT NULL OR mesh IS NULL OR mesh <> ALL(%s::text[]))"
        )
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
                self.dsn, autocommit=True, connect_timeout=5,
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                application_name="trio-drain",
            )
        except psycopg.Error as exc:
            raise _translate(exc, self.where) from None
        if self.durability == "normal":
            conn.execute("SET synchronous_commit = off")
        return conn

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn` in one transaction on a pooled connection, in a thread."""
        if self.closed:
            raise StoreClosed("the outbox is closed")
        async with self._limiter:
            box = [self._idle.pop() if self._idle else None]
            try:
                result = await trio.to_thread.run_sync(self._run_sync, box, fn)
            finally:
                if box[0] is not None:
                    self._idle.append(box[0])
        if self._lost:
            self._lost = False
            log.warning("PostgreSQL outbox at %s is reachable again", self.where)
        return result

    def _run_sync(self, box: list[psycopg.Connection[Any] | None], fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = box[0]
        try:
            if conn is None:
                conn = box[0] = self.connect()
            with conn.transaction():
                return fn(conn)
        except psycopg.Error as exc:
            if conn is not None and (conn.broken or isinstance(exc, psycopg.OperationalError)):
                box[0] = None
                conn.close()
                if not self._lost:
                    self._lost = True
                    log.warning("lost a connection to the PostgreSQL outbox at %s (%s);"
                                " reconnecting on next use", self.where, _first_line(exc))
            raise _translate(exc, self.where) from None
        except StoreUnavailable:
            self._lost = True
            raise

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
    now: int, limit: int, lease_ms: int, max_age_ms: int, token: str, exclude: RouteFilter
) -> tuple[str, list[Any]]:
    clause, params = _route_clause(exclude)
    sql = (
        "WITH picked AS (SELECT id FROM outbox"
        " WHERE status = 'pending' AND next_attempt_at <= %s AND enqueued_at >= %s" + clause
        + " ORDER BY priority_rank, enqueued_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        " UPDATE outbox SET status = 'inflight', attempts = outbox.attempts + 1,"
        " lease_token = %s, lease_expires_at = %s FROM picked WHERE outbox.id = picked.id"
        f" RETURNING {_RETURNING}, outbox.priority_rank"
    )
    return sql, [now, now - max_age_ms, *params, limit, token, now + lease_ms]


def _claim(conn: psycopg.Connection[Any], sql: str, args: list[Any]) -> Rows:
    return in_claim_order(conn.execute(sql, args).fetchall())


# One statement for the whole batch; the fence is in the join.
_COMPLETE = (
    "UPDATE outbox SET status = c.status, attempts = c.attempts,"
    " next_attempt_at = c.next_attempt_at, last_error = c.last_error,"
    " delivered_at = c.delivered_at, broker_message_id = c.broker_message_id,"
    " lease_token = NULL, lease_expires_at = NULL"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::integer[], %s::bigint[],"
    "  %s::text[], %s::bigint[], %s::text[])"
    " AS c(id, token, status, attempts, next_attempt_at, last_error, delivered_at,"
    "  broker_message_id)"
    " WHERE outbox.id = c.id AND outbox.status = 'inflight' AND outbox.lease_token = c.token"
    " RETURNING c.id, c.token"
)


def _complete(conn: psycopg.Connection[Any], completions: Sequence[Completion]) -> Applied:
    # Losing an outcome to a server crash is harmless (the lease brings the
    # row back and the broker dedupes the resend), so these commits do not
    # wait for the WAL flush.
    conn.execute("SET LOCAL synchronous_commit = off")
    applied = {(r[0], r[1]) for r in conn.execute(_COMPLETE, [
        [c.row_id for c in completions], [c.lease_token for c in completions],
        [c.status.value for c in completions], [c.attempts for c in completions],
        [c.next_attempt_at for c in completions], [c.last_error for c in completions],
        [c.delivered_at for c in completions], [c.broker_message_id for c in completions],
    ])}
    return [(c.row_id, c.lease_token) in applied for c in completions]


class PostgresBackend:
    """An outbox in a PostgreSQL database. Build it with `PostgresBackend.open`."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.where = pool.where
        self.listen_reconnect = (0.1, 5.0)  # backoff of the LISTEN connection, seconds
        #: Whether `watch` holds a live LISTEN connection right now.
        self.listening = False

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

    # -- accept

    async def accept_many(self, rows: Sequence[NewRow]) -> Outcomes:
        # The first row of each client_message_id is offered for insert; a
        # repeat later in the batch is decided against it, like any other
        # existing row. ON CONFLICT waits for a concurrent insert of the
        # same id to commit or roll back, so exactly one of them wins and
        # the others read the winner's row.
        first_of: dict[str, NewRow] = {}
        for r in rows:
            first_of.setdefault(r.client_message_id, r)
        firsts = list(first_of.values())

        def op(conn: psycopg.Connection[Any]) -> Outcomes:
            inserted = {r[0] for r in conn.execute(_INSERT, _columns([new_row_values(r) for r in firsts])).fetchall()}
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
                    existing.get(cid), client_message_id=cid, fingerprint=row.request_fingerprint,
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

    async def claim(
        self, *, now: int, limit: int, lease_ms: int, max_age_ms: int, token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> Rows:
        claim = _claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: psycopg.Connection[Any]) -> Rows:
            return _claim(conn, *claim)

        return await self._pool.run(op)

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        def op(conn: psycopg.Connection[Any]) -> Applied:
            return _complete(conn, completions)

        return await self._pool.run(op)

    async def complete_and_claim(
        self, completions: Sequence[Completion], *, now: int, limit: int, lease_ms: int, max_age_ms: int,
        token: str, exclude: RouteFilter = NO_FILTER,
    ) -> tuple[Applied, Rows]:
        claim = _claim_statement(now, limit, lease_ms, max_age_ms, token, exclude)

        def op(conn: psycopg.Connection[Any]) -> tuple[Applied, Rows]:
            return _complete(conn, completions), _claim(conn, *claim)

        return await self._pool.run(op)

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        # The state machine's two answers, at the attempt cap and below it.
        cap_status, cap_error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=True)
        status, error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=False)

        def due(to: Status) -> str:  # a row put back is due at once
            return "%(now)s" if to is Status.PENDING else "outbox.next_attempt_at"

        sql = (
            "WITH expired AS (SELECT id FROM outbox WHERE status = 'inflight'"
            " AND (lease_expires_at IS NULL OR lease_expires_at <= %(now)s) FOR UPDATE SKIP LOCKED),"
            " fate AS (SELECT outbox.id, outbox.attempts >= %(cap)s AS at_cap FROM outbox"
            "  JOIN expired ON outbox.id = expired.id)"
            " UPDATE outbox SET"
            " status = CASE WHEN fate.at_cap THEN %(cap_status)s ELSE %(status)s END,"
            " last_error = CASE WHEN fate.at_cap THEN %(cap_error)s ELSE %(error)s END,"
            f" next_attempt_at = CASE WHEN fate.at_cap THEN {due(cap_status)} ELSE {due(status)} END,"
            " lease_token = NULL, lease_expires_at = NULL FROM fate WHERE outbox.id = fate.id"
        )
        args = {"now": now, "cap": max_attempts, "cap_status": cap_status.value, "cap_error": cap_error,
                "status": status.value, "error": error}

        def op(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(sql, args).rowcount

        return await self._pool.run(op)

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        sql = (
            "UPDATE outbox SET status = 'dead', last_error = %s WHERE id IN (SELECT id FROM outbox"
            " WHERE status = 'pending' AND enqueued_at < %s FOR UPDATE SKIP LOCKED)"
        )

        def op(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(sql, (_lifecycle.EXPIRED, now - max_age_ms)).rowcount

        return await self._pool.run(op)

    async def next_due_at(
        self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER
    ) -> int | None:
        clause, params = _route_clause(exclude)
        sql = (
            "SELECT next_attempt_at FROM outbox WHERE status = 'pending' AND enqueued_at >= %s"
            + clause + " ORDER BY next_attempt_at LIMIT 1"
        )

        def op(conn: psycopg.Connection[Any]) -> int | None:
            found = conn.execute(sql, [now - max_age_ms, *params]).fetchone()
            return None if found is None else int(found[0])

        return await self._pool.run(op)

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
                log.warning("LISTEN connection to %s lost (%s); reconnecting in %.1fs",
                            self.where, _first_line(exc), delay)
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

    async def list(
        self, *, status: Status | None, limit: int, before: int | None = None
    ) -> Rows:
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
        def op(conn: psycopg.Connection[Any]) -> OutboxRow:
            aborted, successor = _lifecycle.requeued(
                _locked_row(conn, row_id), now=now, new_id=new_id,
                new_client_message_id=new_client_message_id, by=by,
            )
            conn.execute(_INSERT, _columns([row_values(successor)]))
            write_aborted(conn, aborted, mark="%s")
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            return successor

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


def _migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the schema; processes starting together take turns."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    version = schema_version(conn)
    if version < 1:
        conn.execute(_CREATE_TABLE)
        for statement in INDEXES:
            conn.execute(statement)
        record_schema_version(conn, mark="%s")
