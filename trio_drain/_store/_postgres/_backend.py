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

Wakeups across processes are `_listen`'s; connections, the pool and
translated errors are `_pool`'s; the table is `_schema`'s; the SQL of the
hot path (insert, claim, completion) is `_statements`', and a big batch's
COPY `_copy`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
import psycopg
import psycopg.conninfo
import psycopg.errors

from ... import _lifecycle
from ..._errors import ConfigError, StoreUnavailable
from ..._lifecycle import (
    AT_ATTEMPT_CAP,
    LANE_HOLD_RAN_OUT,
    LEASE_RAN_OUT,
    PAST_MAX_AGE,
    WAITING,
    Completion,
    UnknownFate,
)
from ..._model import NewRow, OutboxRow, Status
from .._base import (
    NO_FILTER,
    Applied,
    Durability,
    Outcomes,
    RouteFilter,
    Rows,
    check_durability,
    row_values,
)
from .._lanes import LEAVES_LANE, SETTLE_JOINED_FIRST_OF, lane_keys, lock, places, release_next
from .._operations import SqlOperations
from .._sql import POSTGRES, SERVER_NOW
from ._copy import COPY_SQL, FIRST_CHUNK, copy_new_rows, in_lanes, take_rest
from ._joint import Joiner
from ._listen import Listener
from ._lost_writes import LostWrites
from ._pipelines import (
    NEW_ROW,
    NEW_ROWS,
    applied_of,
    begin_worker_write,
    claimed_rows,
    insert_new_rows,
    send_claim,
    send_complete,
)
from ._pool import Commit, Pool
from ._schema import migrate
from ._statements import (
    CHANNEL,
    COMPLETE,
    INSERT,
    as_columns,
    claim_statement,
    complete_rows,
    completed_lanes,
)
from ._wire import Wire

T = TypeVar("T")
log = logging.getLogger("trio_drain.postgres")


# Only `sent=False` of `on_released` is used, which reads no policy field.
_GIVE_BACK_POLICY = _lifecycle.RetryPolicy()


class PostgresBackend(SqlOperations):
    """An outbox in a PostgreSQL database. Build it with `PostgresBackend.open`.

    Times: due-ness, lease expiry and max_age are judged by the server's
    clock; the `now` arguments of the worker's calls do not decide them (see
    each method).
    """

    dialect = POSTGRES
    lock_for_update = " FOR UPDATE"

    #: Batches of at least this many rows `Outbox.accept_many` hands over
    #: to `accept_prepared`, which validates them as it copies them in.
    stream_from = 64

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.where = pool.where
        self.listener = Listener(pool, self.where)
        #: Whether `watch` holds a live LISTEN connection right now.
        #: Tests only: a stand-in for the server's clock (ms), so that a fake
        #: clock can move leases and due times; None (the default) uses the
        #: server's own.
        self.server_clock: Callable[[], int] | None = None
        # The server's clock minus the caller's, as last measured (None: not yet).
        self._offset: int | None = None
        self._lost_writes = LostWrites()
        self._joiner = Joiner(self._insert, flights=max(1, pool.size // 2))

    @classmethod
    async def open(cls, dsn: str, *, durability: Durability = "full", pool_size: int = 8) -> PostgresBackend:
        check_durability(durability)
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"malformed PostgreSQL URL: {exc}") from None
        pool = Pool(dsn, size=pool_size, durability=durability)
        try:
            await pool.run(migrate)
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
        now (the rows' own, from the caller's clock, are not stored). One
        round trip from Trio, durable at its commit (`insert_new_rows`);
        concurrent calls share it (`Joiner`)."""
        return await self._joiner.accept(rows)

    async def accept_prepared(self, take: Callable[[int], list[NewRow]]) -> Outcomes:
        """`accept_many` of a big batch whose rows `take(k)` validates and
        returns `k` at a time (fewer at the end, none once done), so that
        the server writes each chunk while the next is validated: a binary
        COPY into the table (`copy_new_rows`) when no row of the first chunk
        is in a lane, else the insert. A malformed request raises
        InvalidRequest from `take`, and nothing is written. Not shared with
        concurrent accepts (`Joiner`): a batch this big fills its own
        statement."""
        first = take(FIRST_CHUNK)
        if in_lanes(first):
            return await self.accept_many(first + take_rest(take))
        copy, sql = self._sql(COPY_SQL), (self._sql(NEW_ROW), self._sql(NEW_ROWS))

        async def op(w: Wire) -> Outcomes:
            return await copy_new_rows(w, take, first, copy, sql)

        return await self._pool.exchange(op)

    async def _insert(self, rows: Sequence[NewRow]) -> Outcomes:
        sql = (self._sql(NEW_ROW), self._sql(NEW_ROWS))

        async def op(w: Wire) -> Outcomes:
            return await insert_new_rows(w, rows, sql)

        return await self._pool.exchange(op)

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
        sql, args = claim_statement(limit, lease_ms, max_age_ms, token, exclude)
        sql = self._sql(sql)
        commit = Commit()

        async def op(w: Wire) -> Rows:
            begin_worker_write(w)
            send_claim(w, sql, args)
            rows = claimed_rows((await w.exchange())[-1], commit)
            await w.commit(commit, rows)
            return rows

        return self._claimed(await self._pool.exchange(op, commit), now=now, lease_ms=lease_ms)

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        """Apply completions. A pending row's retry time, the caller's now
        plus a delay, is moved onto the server's clock by the offset last
        measured between the two."""
        recovered = await self._lost_writes.settle(completions, self._pool)
        if recovered is not None:
            applied, rows = recovered
            if rows:  # it claimed rows this call cannot hand over: give them back
                await self._give_back(rows)
            return applied
        sql = self._sql(COMPLETE)
        offset = self._offset or 0
        commit = Commit()

        async def op(w: Wire) -> Applied:
            lanes = completed_lanes(completions)
            begin_worker_write(w, lanes)
            send_complete(w, sql, completions, host_now=None, offset=offset)
            applied = applied_of((await w.exchange())[2 + len(lanes)], completions, commit)
            await w.commit(commit, applied)
            return applied

        try:
            return await self._pool.exchange(op, commit)
        except StoreUnavailable:
            if commit.unsettled:
                self._lost_writes.remember(completions, commit, applied=commit.value, token=None)
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
        recovered = await self._lost_writes.settle(completions, self._pool)
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
        claim_sql, claim_args = claim_statement(limit, lease_ms, max_age_ms, token, exclude)
        claim_sql, complete_sql = self._sql(claim_sql), self._sql(COMPLETE)
        commit = Commit()

        async def op(w: Wire) -> tuple[Applied, Rows]:
            lanes = completed_lanes(completions)
            begin_worker_write(w, lanes)
            if completions:
                send_complete(w, complete_sql, completions, host_now=now, offset=0)
            send_claim(w, claim_sql, claim_args)
            results = await w.exchange()
            applied = applied_of(results[2 + len(lanes)], completions, commit) if completions else []
            rows = claimed_rows(results[-1], commit)
            await w.commit(commit, (applied, rows))
            return applied, rows

        try:
            applied, rows = await self._pool.exchange(op, commit)
        except StoreUnavailable:
            if commit.unsettled:
                lost_applied, lost_rows = commit.value
                self._lost_writes.remember(
                    completions, commit, applied=lost_applied, token=token if lost_rows else None
                )
            raise
        return applied, self._claimed(rows, now=now, lease_ms=lease_ms)

    async def _give_back(self, rows: Rows) -> None:
        """Hand claimed rows nobody will send back to pending, due at once,
        their attempt given back (`on_released` before a send)."""
        # `on_released` puts the rows due at its `now`; 0 here, with a host
        # now of 0, is the server's now.
        completions = [_lifecycle.on_released(r, sent=False, now=0, policy=_GIVE_BACK_POLICY) for r in rows]
        sql = self._sql(COMPLETE)

        def op(conn: psycopg.Connection[Any]) -> Applied:
            return complete_rows(conn, sql, completions, host_now=0, offset=0, commit=None)

        await self._pool.run(op)

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        """Leases expire by the server's clock (`now` is ignored); a row put
        back is due at the server's now."""
        ran_out, args = POSTGRES.where(LEASE_RAN_OUT)
        at_cap, cap_args = POSTGRES.where(AT_ATTEMPT_CAP, max_attempts=max_attempts, table="outbox")
        # The state machine's two answers, at the attempt cap and below it.
        cap_status, cap_error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=True)
        status, error = _lifecycle.on_lease_expired(unknown_fate=unknown_fate, at_cap=False)

        def due(to: Status) -> str:  # a row put back is due at once
            return SERVER_NOW if to is Status.PENDING else "outbox.next_attempt_at"

        hold, hold_args = POSTGRES.where(LANE_HOLD_RAN_OUT)
        lanes_sql = self._sql(
            f"SELECT DISTINCT ordering_key FROM outbox WHERE ({ran_out} OR {hold}) AND ordering_key IS NOT NULL"
        )
        # Rows aborted in flight whose leases ran out stop holding their lanes.
        holds_sql = self._sql(
            f"UPDATE outbox SET lease_expires_at = NULL WHERE id IN (SELECT id FROM outbox WHERE {hold}"
            " AND ordering_key = ANY(%s::text[]) FOR UPDATE SKIP LOCKED) RETURNING id, ordering_key, enqueued_at"
        )
        sql = self._sql(
            f"WITH expired AS (SELECT id FROM outbox WHERE {ran_out}"
            " AND (ordering_key IS NULL OR ordering_key = ANY(%s::text[])) FOR UPDATE SKIP LOCKED),"
            f" fate AS (SELECT outbox.id, {at_cap} AS at_cap FROM outbox"
            "  JOIN expired ON outbox.id = expired.id)"
            " UPDATE outbox SET"
            " status = CASE WHEN fate.at_cap THEN %s ELSE %s END,"
            " last_error = CASE WHEN fate.at_cap THEN %s ELSE %s END,"
            f" next_attempt_at = CASE WHEN fate.at_cap THEN {due(cap_status)} ELSE {due(status)} END,"
            " lease_token = NULL, lease_expires_at = NULL FROM fate WHERE outbox.id = fate.id"
            " RETURNING outbox.status, outbox.id, outbox.ordering_key, outbox.enqueued_at"
        )
        values = [*args, *cap_args, cap_status.value, status.value, cap_error, error]

        def op(conn: psycopg.Connection[Any]) -> int:
            lanes = self._lock_lanes_found(conn, lanes_sql, [*args, *hold_args])
            moved = conn.execute(sql, [*args, lanes, *values[len(args) :]]).fetchall()
            release_next(conn, POSTGRES, places(found for to, *found in moved if Status(to) in LEAVES_LANE))
            release_next(conn, POSTGRES, places(conn.execute(holds_sql, [*hold_args, lanes]).fetchall()))
            return len(moved)

        return await self._pool.run(op)

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        """Age by the server's clock (`now` is ignored)."""
        past, args = POSTGRES.where(PAST_MAX_AGE, max_age_ms=max_age_ms)
        lanes_sql = self._sql(
            f"SELECT DISTINCT ordering_key FROM outbox WHERE {past} AND ordering_key IS NOT NULL"
        )
        sql = self._sql(
            "UPDATE outbox SET status = 'dead', last_error = %s"
            f" WHERE id IN (SELECT id FROM outbox WHERE {past}"
            " AND (ordering_key IS NULL OR ordering_key = ANY(%s::text[])) FOR UPDATE SKIP LOCKED)"
            " RETURNING id, ordering_key, enqueued_at"
        )

        def op(conn: psycopg.Connection[Any]) -> int:
            lanes = self._lock_lanes_found(conn, lanes_sql, args)
            moved = conn.execute(sql, (_lifecycle.EXPIRED, *args, lanes)).fetchall()
            release_next(conn, POSTGRES, places(moved))
            return len(moved)

        return await self._pool.run(op)

    @staticmethod
    def _lock_lanes_found(conn: psycopg.Connection[Any], sql: str, args: Sequence[Any]) -> list[str]:
        """A sweep's lanes, locked before any row is: the lanes of the rows
        `sql` finds now. The sweep then leaves alone rows of lanes it did not
        lock (a row that became due since waits for the next sweep)."""
        keys = lane_keys(key for (key,) in conn.execute(sql, args).fetchall())
        lock(conn, keys)
        return keys

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        """The next due time on the caller's clock: `now` plus how far in the
        server's future the row is due (so a caller whose clock is off
        sleeps the right time); age by the server's clock."""
        waiting, args = POSTGRES.where(WAITING, max_age_ms=max_age_ms)
        routes, route_args = POSTGRES.routes(exclude)
        sql = self._sql(
            f"SELECT (SELECT next_attempt_at FROM outbox WHERE {waiting}{routes}"
            f" ORDER BY next_attempt_at LIMIT 1), {SERVER_NOW}"
        )

        def op(conn: psycopg.Connection[Any]) -> tuple[int | None, int]:
            found = conn.execute(sql, [*args, *route_args]).fetchone()
            assert found is not None
            return found[0], int(found[1])

        due, server_now = await self._pool.run(op)
        self._measured(now, server_now)
        return None if due is None else now + (int(due) - server_now)

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """LISTEN for accepts in other processes and call `wake` for each burst
        (`Listener.run`); runs until cancelled."""
        await self.listener.run(wake)

    @property
    def listening(self) -> bool:
        """Whether the LISTEN connection is up."""
        return self.listener.listening

    # -- what SqlOperations needs

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._pool.run(fn)

    async def _write(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._pool.run(fn)

    def _lock_lanes(self, conn: psycopg.Connection[Any], keys: Sequence[str]) -> None:
        lock(conn, keys)

    def _tell_workers(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    def _insert_successor(self, conn: psycopg.Connection[Any], row: OutboxRow) -> OutboxRow:
        """The successor is enqueued (and due) at the server's now, and workers are told."""
        found = conn.execute(self._sql(INSERT), as_columns([row_values(row)])).fetchone()
        assert found is not None  # a fresh client_message_id
        if row.ordering_key is not None:  # it joined the end of its lane
            conn.execute(SETTLE_JOINED_FIRST_OF, ([row.id],))
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        return attrs.evolve(row, enqueued_at=found[1], next_attempt_at=found[1])
