"""What only the PostgreSQL back end does: many connections and processes on
one outbox, LISTEN/NOTIFY wakeups, surviving a server restart.

The store and worker tests already run against PostgreSQL too (see the
`outbox_target` fixture); these cover what SQLite has no counterpart for.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_drain import (
    AcceptOutcome,
    ConfigError,
    DrainConfig,
    Outbox,
    SchemaError,
    SendRequest,
    Status,
    StoreError,
    StoreUnavailable,
    open_outbox,
)
from trio_drain import _lifecycle as lc
from trio_drain._brokers._identity import generate_secret_key
from trio_drain._store._base import SCHEMA_VERSION, RouteFilter
from trio_drain._store._lanes import SETTLE_JOINED_FIRST_OF, release_next_sql
from trio_drain._store._postgres._backend import PostgresBackend
from trio_drain._store._postgres._joint import Joiner
from trio_drain._store._postgres._pool import Commit, committed
from trio_drain._store._postgres._schema import MIN_POSTGRES
from trio_drain._store._postgres._statements import claim_statement
from trio_drain._store._postgres._wire import Wire
from trio_drain._store._sql import POSTGRES

from .builders import BIG, req
from .helpers import FakeBroker, Rig, wait_settled, wait_until
from .pg import PostgresServer, free_port
from .procs import SHORT_LEASES, Broker, counts, fill, start_run, stop_all, wait_for_done, write_config

FAST = DrainConfig(
    poll_interval=30.0,
    lease=5.0,
    ack_timeout=2.0,
    maintenance_interval=0.2,
    max_inflight=16,
    batch_size=16,
    backoff_base=0.01,
    backoff_cap=0.05,
)


# -- opening ---------------------------------------------------------------------------


async def test_a_malformed_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="malformed PostgreSQL URL"):
        async with open_outbox("postgresql://u@h/db?bogus_option=1"):
            pass


async def test_an_unreachable_server_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="unavailable"):
        async with open_outbox(f"postgresql://postgres@127.0.0.1:{free_port()}/x"):
            pass


async def test_processes_opening_a_fresh_database_together_migrate_it_once(pg_url: str) -> None:
    async def open_one() -> None:
        async with open_outbox(pg_url) as ob:
            await ob.counts()

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(open_one)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM trio_drain_schema").fetchall() == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with open_outbox(pg_url):
        pass
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE trio_drain_schema SET version = 99")
    with pytest.raises(SchemaError, match="upgrade"):
        async with open_outbox(pg_url):
            pass


async def test_a_server_too_old_for_the_sql_is_refused_at_open_and_nothing_is_created(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psycopg.ConnectionInfo, "server_version", property(lambda self: 110009))
    with pytest.raises(StoreError, match=r"version 11\.9; trio-drain needs 12\.0 or newer"):
        async with open_outbox(pg_url):
            pass
    monkeypatch.undo()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('outbox'), to_regclass('trio_drain_schema')").fetchone() == (
            None,
            None,
        )
        assert conn.info.server_version >= MIN_POSTGRES  # the real server is new enough


async def test_the_claim_query_uses_the_claim_index(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(2000)])
    with psycopg.connect(pg_url) as conn:
        conn.execute("ANALYZE outbox")
        # The claim as the store runs it: its terms come from the state machine.
        sql, args = claim_statement(128, 60_000, BIG, "t", RouteFilter())
        cursor = psycopg.ClientCursor(conn)
        cursor.execute("EXPLAIN " + sql, args)
        plan = "\n".join(r[0] for r in cursor.fetchall())
    assert "outbox_claim" in plan and "Sort" not in plan, plan


async def test_the_claim_by_the_servers_clock_still_uses_the_claim_index(pg_url: str) -> None:
    # The server's now is written so that the planner sees its value: as a
    # subquery (evaluated once) it could not, and claimed by the due index
    # and a sort of every due row.
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(2000)])
    sql, args = claim_statement(128, 60_000, BIG, "t", RouteFilter(meshes=frozenset({"beta"})))
    with psycopg.connect(pg_url) as conn:
        conn.execute("ANALYZE outbox")
        cursor = psycopg.ClientCursor(conn)
        cursor.execute("EXPLAIN " + sql, args)
        plan = "\n".join(r[0] for r in cursor.fetchall())
    assert "outbox_claim" in plan and "Sort" not in plan, plan
    assert "statement_timestamp()" in plan


@pytest.mark.parametrize(
    "exclude",
    [RouteFilter(), RouteFilter(meshes=frozenset({"beta"}))],
    ids=["every route", "a route left out"],
)
async def test_a_claim_on_a_table_never_analyzed_walks_the_claim_index(
    pg_url: str, exclude: RouteFilter
) -> None:
    # A fresh outbox holds a backlog before autovacuum has looked at it: the
    # planner has no statistics, and must not sort the backlog to claim.
    async with open_outbox(pg_url, durability="normal") as ob:
        for start in range(0, 20_000, 5000):
            await ob.accept_many([req(f"m-{i}") for i in range(start, start + 5000)])
    sql, args = claim_statement(32, 60_000, BIG, "t", exclude)
    with psycopg.connect(pg_url) as conn:
        found = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'outbox'").fetchone()
        assert found is not None and found[0] < 0  # never analyzed
        cursor = psycopg.ClientCursor(conn)
        cursor.execute("EXPLAIN " + sql, args)
        plan = "\n".join(r[0] for r in cursor.fetchall())
        # The wire prepares it: the plan the server may keep for every run.
        marks = iter(range(1, len(args) + 1))
        numbered = re.sub("%s", lambda _: f"${next(marks)}", sql)
        conn.execute(f"PREPARE claim AS {numbered}")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute("EXPLAIN EXECUTE claim (" + ", ".join(["%s"] * len(args)) + ")", args)
        generic = "\n".join(r[0] for r in cursor.fetchall())
    for p in (plan, generic):
        assert "outbox_claim" in p and "Sort" not in p, p


async def test_concurrent_accepts_share_statements_and_each_keeps_its_answer(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        backend = ob.backend
        assert isinstance(backend, PostgresBackend)
        outcomes: dict[str, AcceptOutcome] = {}

        async def caller(k: int) -> None:
            for i in range(5):
                cid = f"c{k}-{i}" if i != 4 else "shared"
                outcomes[f"{k}-{i}"] = await ob.accept(
                    req(cid, payload=b"p" if cid == "shared" else cid.encode())
                )

        async with trio.open_nursery() as nursery:
            for k in range(64):
                nursery.start_soon(caller, k)
        joiner = backend._joiner
        assert joiner.calls == 320
        assert joiner.statements < 160  # shared, most of them
        shared = [o for key, o in outcomes.items() if key.endswith("-4")]
        assert sum(o.inserted for o in shared) == 1
        assert len({o.row_id for o in shared}) == 1
        assert (await ob.counts())["pending"] == 64 * 4 + 1


# -- many connections on one outbox ----------------------------------------------------------


async def test_concurrent_accepts_of_one_id_from_many_connections_make_one_row(pg_url: str) -> None:
    results: list[AcceptOutcome] = []
    clash = req("same", payload=b"other payload")

    async def accept(ob: Outbox, request: SendRequest) -> None:
        results.append(await ob.accept(request))

    async def accept_all(n: int) -> None:
        # Each outbox has its own pool, so its own connections.
        async with open_outbox(pg_url) as ob, trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(accept, ob, clash if (n, i) == (3, 7) else req("same"))

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(accept_all, n)
    assert len(results) == 32
    inserted = [r for r in results if r.inserted]
    assert len(inserted) == 1
    conflicts = [r for r in results if r.kind == "conflict"]
    # The clash is a conflict, unless it won the race and the others conflict with it.
    assert len(conflicts) in (1, 31)
    assert {r.row_id for r in results} == {inserted[0].row_id}
    async with open_outbox(pg_url) as ob:
        assert (await ob.counts())["pending"] == 1


async def test_claims_from_many_connections_never_take_a_row_twice(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(600)])
    claimed: list[str] = []

    async def claimer(n: int) -> None:
        async with open_outbox(pg_url) as ob:
            while rows := await ob.claim(limit=7, lease_ms=60_000, max_age_ms=BIG, token=f"t{n}"):
                claimed.extend(r.client_message_id for r in rows)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(claimer, n)
    assert len(claimed) == 600
    assert len(set(claimed)) == 600


async def test_a_notify_from_another_process_wakes_an_idle_worker_at_once(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob, trio.open_nursery() as nursery:
        broker = FakeBroker()
        await Rig(ob, nursery, broker, config=FAST).start()  # polls every 30 s
        backend = ob.backend
        assert isinstance(backend, PostgresBackend)
        await wait_until(lambda: backend.listening, seconds=5)
        async with open_outbox(pg_url) as other:  # no in-process listener links the two
            start = trio.current_time()
            await other.accept(req("m-1"))
            await wait_until(lambda: bool(broker.received), seconds=5)
        assert broker.arrivals[0] - start < 1.0
        nursery.cancel_scope.cancel()


# -- a server restart under a running worker ---------------------------------------------------


@pytest.fixture
def own_server(pg_server: PostgresServer) -> Iterator[PostgresServer]:
    """A server of the test's own, to restart without disturbing the others."""
    server = PostgresServer(pg_server.bindir).start()
    try:
        yield server
    finally:
        server.destroy()


async def test_a_server_restart_under_a_running_worker_loses_nothing(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = await trio.to_thread.run_sync(own_server.create_database)
    config = attrs.evolve(FAST, poll_interval=0.2)
    async with open_outbox(url) as ob, trio.open_nursery() as nursery:
        await ob.accept_many([req(f"m-{i}") for i in range(400)])
        broker = FakeBroker(delay=0.01)
        await Rig(ob, nursery, broker, config=config).start()
        await wait_until(lambda: len(broker.accepted) >= 50, seconds=10)
        await trio.to_thread.run_sync(own_server.stop)

        with trio.fail_after(10):  # refused at once, not hung
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await ob.accept(req("during-outage"))
        await trio.sleep(0.5)  # the worker meets the outage too
        await trio.to_thread.run_sync(own_server.start)
        await ob.accept(req("after-restart"))
        await wait_settled(ob, 401, among=("done",), seconds=30, through_outages=True)
        nursery.cancel_scope.cancel()
    assert set(broker.accepted) == {f"m-{i}" for i in range(400)} | {"after-restart"}
    text = caplog.text
    assert "lost a connection" in text and "reachable again" in text
    assert "LISTEN connection" in text  # the listener noticed and reconnected


# -- several drain processes on one outbox -----------------------------------------------------


def test_a_drain_process_killed_mid_drain_loses_nothing(tmp_path: Path, pg_url: str) -> None:
    n = 3000
    fill(pg_url, n)
    broker = Broker(tmp_path, "--ack-delay", "0.005").start()
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain=SHORT_LEASES)
    workers = [start_run(pg_url, config) for _ in range(3)]
    try:
        wait_for_done(pg_url, n // 4, 60, *workers)
        workers[0].kill()  # SIGKILL: no cleanup, its claims stay inflight until their lease ends
        workers[0].wait(timeout=10)
        wait_for_done(pg_url, n, 120, *workers)
    finally:
        errors = stop_all(*workers)
        broker.stop()
    assert all("Traceback" not in e for e in errors[1:]), errors
    assert workers[1].returncode == workers[2].returncode == 0, errors
    after = counts(pg_url)
    assert after["done"] == n, after
    sent = broker.sent()
    assert set(sent) == {f"r-{i}" for i in range(n)}
    resent = sum(c - 1 for c in sent.values())
    # Only what the killed process had in flight can go out twice.
    assert resent <= 16, resent
    ledger = sqlite3.connect(broker.ledger)
    try:
        assert ledger.execute(
            "SELECT count(*), count(DISTINCT client_message_id) FROM accepted"
        ).fetchone() == (n, n)
    finally:
        ledger.close()


# -- a COMMIT whose answer is lost -------------------------------------------------------------


@contextmanager
def connection_dropped_at_commit(
    monkeypatch: pytest.MonkeyPatch, *, applied: bool = True
) -> Iterator[list[int]]:
    """The next worker transaction's COMMIT is applied by the server (or,
    with `applied=False`, never reaches it), then the connection drops
    before the answer arrives: the wire raises OperationalError either way.
    Yields a list that holds one item once the drop was made."""
    real_commit = Wire.commit
    drops: list[int] = []

    async def commit_then_drop(self: Wire, commit: Commit, value: Any) -> None:
        if drops:
            return await real_commit(self, commit, value)
        drops.append(1)
        if applied:
            await real_commit(self, commit, value)  # COMMIT: the server applies it
        else:
            commit.value, commit.committing = value, True
        self.conn.close()  # and the answer is lost with the connection
        raise psycopg.OperationalError("server closed the connection unexpectedly (injected)")

    monkeypatch.setattr(Wire, "commit", commit_then_drop)
    try:
        yield drops
    finally:
        monkeypatch.setattr(Wire, "commit", real_commit)


async def _acked_batch(ob: Outbox) -> list[lc.Completion]:
    """Six rows accepted, the first three claimed (token t1) and acked."""
    await ob.accept_many([req(f"m-{i}") for i in range(6)])
    first = await ob.claim(limit=3, lease_ms=60_000, max_age_ms=BIG, token="t1")
    return [lc.on_ack(r, broker_message_id=f"b-{r.client_message_id}", now=ob.clock()) for r in first]


async def _held_by(ob: Outbox, token: str) -> list[str]:
    return sorted(r.client_message_id for r in await ob.list(Status.INFLIGHT) if r.lease_token == token)


async def test_complete_and_claim_whose_commit_answer_is_lost_still_returns_its_rows_and_outcomes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox(pg_url) as ob:
        acks = await _acked_batch(ob)
        with connection_dropped_at_commit(monkeypatch) as drops:
            applied, rows = await ob.complete_and_claim(
                acks, limit=3, lease_ms=60_000, max_age_ms=BIG, token="t2"
            )
        assert drops == [1]
        assert applied == [True, True, True]
        assert sorted(r.client_message_id for r in rows) == ["m-3", "m-4", "m-5"]
        assert all(r.status is Status.INFLIGHT and r.lease_token == "t2" for r in rows)
        assert await _held_by(ob, "t2") == ["m-3", "m-4", "m-5"]
        assert await ob.counts() == {"pending": 0, "inflight": 3, "done": 3, "dead": 0, "aborted": 0}


async def test_complete_whose_commit_answer_is_lost_reports_its_outcomes_applied(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox(pg_url) as ob:
        acks = await _acked_batch(ob)
        with connection_dropped_at_commit(monkeypatch) as drops:
            assert await ob.complete(acks) == [True, True, True]
        assert drops == [1]
        assert (await ob.counts())["done"] == 3


async def test_a_claim_whose_commit_answer_is_lost_still_returns_its_rows(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(4)])
        with connection_dropped_at_commit(monkeypatch) as drops:
            rows = await ob.claim(limit=3, lease_ms=60_000, max_age_ms=BIG, token="t1")
        assert drops == [1]
        assert sorted(r.client_message_id for r in rows) == ["m-0", "m-1", "m-2"]
        assert await _held_by(ob, "t1") == ["m-0", "m-1", "m-2"]


async def _lost_unsettled(
    ob: Outbox, monkeypatch: pytest.MonkeyPatch, acks: list[lc.Completion]
) -> list[int]:
    """complete_and_claim (token t2) whose COMMIT is applied but answered by
    a dropped connection, and the server then cannot be reached to settle
    it: the caller gets StoreUnavailable. Returns the refused reconnects."""
    backend = ob.backend
    assert isinstance(backend, PostgresBackend)
    pool = backend._pool
    real_connect = pool.connect
    refusals: list[int] = []

    def connect_refused_once() -> psycopg.Connection[Any]:
        if not refusals:
            refusals.append(1)
            raise StoreUnavailable("injected: the server cannot be reached")
        return real_connect()

    with connection_dropped_at_commit(monkeypatch):
        monkeypatch.setattr(pool, "connect", connect_refused_once)
        with pytest.raises(StoreUnavailable):
            await ob.complete_and_claim(acks, limit=3, lease_ms=60_000, max_age_ms=BIG, token="t2")
    monkeypatch.setattr(pool, "connect", real_connect)  # the server is back
    return refusals


async def test_the_retry_of_a_lost_commit_nobody_could_settle_learns_what_it_did(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer to COMMIT is lost and the server cannot be asked at once
    # (reconnecting fails too): the caller gets StoreUnavailable. Its retry
    # of the same outcomes, with a fresh claim token as the completer makes
    # it, finds out what the lost transaction did: outcomes applied (not
    # stale), and the rows it claimed handed over rather than stranded
    # until their lease runs out.
    async with open_outbox(pg_url) as ob:
        acks = await _acked_batch(ob)
        refusals = await _lost_unsettled(ob, monkeypatch, acks)
        applied, rows = await ob.complete_and_claim(
            acks, limit=3, lease_ms=60_000, max_age_ms=BIG, token="t3"
        )
        assert applied == [True, True, True]  # not reported stale
        assert sorted(r.client_message_id for r in rows) == ["m-3", "m-4", "m-5"]
        assert all(r.lease_token == "t2" for r in rows)
        assert await ob.counts() == {"pending": 0, "inflight": 3, "done": 3, "dead": 0, "aborted": 0}
        assert refusals == [1]  # the first call did try to settle it


async def test_rows_a_lost_commit_claimed_that_its_retry_cannot_take_are_handed_back(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retry is a plain `complete` (a stopping worker claims nothing):
    # the rows the lost transaction claimed go back to pending at once, their
    # attempt given back, rather than wait out their lease.
    async with open_outbox(pg_url) as ob:
        acks = await _acked_batch(ob)
        await _lost_unsettled(ob, monkeypatch, acks)
        assert await ob.complete(acks) == [True, True, True]
        back = await ob.list(Status.PENDING)
        assert sorted(r.client_message_id for r in back) == ["m-3", "m-4", "m-5"]
        assert all(r.attempts == 0 and r.lease_token is None for r in back)
        assert len(await ob.claim(limit=10, lease_ms=60_000, max_age_ms=BIG, token="t4")) == 3  # due now


async def test_a_commit_that_never_reached_the_server_changes_nothing_and_its_retry_applies(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_outbox(pg_url) as ob:
        acks = await _acked_batch(ob)
        with (
            connection_dropped_at_commit(monkeypatch, applied=False),
            pytest.raises(StoreUnavailable, match="rolled back"),
        ):
            await ob.complete_and_claim(acks, limit=3, lease_ms=60_000, max_age_ms=BIG, token="t2")
        assert await ob.counts() == {"pending": 3, "inflight": 3, "done": 0, "dead": 0, "aborted": 0}
        applied, rows = await ob.complete_and_claim(
            acks, limit=3, lease_ms=60_000, max_age_ms=BIG, token="t3"
        )
        assert applied == [True, True, True]
        assert sorted(r.client_message_id for r in rows) == ["m-3", "m-4", "m-5"]
        assert all(r.lease_token == "t3" for r in rows)


def test_a_transaction_its_client_left_open_is_ended_and_reported_rolled_back(pg_url: str) -> None:
    # The session that ran it has not noticed its client is gone: settling
    # ends that session (and its transaction) rather than wait for it.
    with psycopg.connect(pg_url) as stuck, psycopg.connect(pg_url, autocommit=True) as asker:
        xid = stuck.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
        assert committed(asker, Commit(xid=xid, pid=stuck.info.backend_pid)) is False
        with pytest.raises(psycopg.OperationalError):
            stuck.execute("SELECT 1")
    with psycopg.connect(pg_url) as done:
        xid = done.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
        done.commit()
        assert committed(done, Commit(xid=xid)) is True


# -- concurrent accepts share a statement (`_joint`)


async def test_a_row_the_server_refuses_fails_only_the_accept_it_belongs_to() -> None:
    statements: list[int] = []

    async def insert(rows: Sequence[Any]) -> list[Any]:
        statements.append(len(rows))
        await trio.sleep(0.01)
        if "bad" in rows:
            raise StoreError("the server refused a value")
        return [f"ok:{r}" for r in rows]

    joiner = Joiner(insert, flights=1)
    answers: dict[str, Any] = {}

    async def accept(rows: list[str]) -> None:
        try:
            answers[rows[0]] = await joiner.accept(rows)  # type: ignore[arg-type]
        except StoreError as exc:
            answers[rows[0]] = exc

    async with trio.open_nursery() as nursery:
        for rows in (["first"], ["a", "b"], ["bad"], ["c"]):
            nursery.start_soon(accept, rows)
            await trio.lowlevel.checkpoint()
    assert answers["first"] == ["ok:first"]
    assert answers["a"] == ["ok:a", "ok:b"] and answers["c"] == ["ok:c"]
    assert isinstance(answers["bad"], StoreError)
    # The lone first caller went at once; the three queued behind it shared
    # a statement, which failed, and then went one by one.
    assert statements == [1, 4, 2, 1, 1]


async def test_an_accept_cancelled_while_queued_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    written: list[str] = []

    async def insert(rows: Sequence[Any]) -> list[Any]:
        await trio.sleep(1)
        written.extend(rows)
        return list(rows)

    joiner = Joiner(insert, flights=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(joiner.accept, ["first"])  # type: ignore[arg-type]
        await trio.sleep(0.1)
        with trio.move_on_after(0.1):
            await joiner.accept(["withdrawn"])  # type: ignore[list-item]
    assert written == ["first"]


async def test_settling_a_lane_walks_the_lane_index_from_the_row_on_a_table_never_analyzed(
    pg_url: str,
) -> None:
    # Settling must cost the same behind a lane of 10 rows or 100,000: each
    # statement walks the lane index from the row it is given and stops at
    # the first answer, whatever the planner knows (here: nothing yet).
    async with open_outbox(pg_url, durability="normal") as ob:
        for start in range(0, 20_000, 5000):
            await ob.accept_many(
                [req(f"m-{i}", ordering_key=f"k{i % 50}") for i in range(start, start + 5000)]
            )
    statements = [
        (release_next_sql(POSTGRES), ("text", "bigint", "text", "text")),
        (SETTLE_JOINED_FIRST_OF, ("text[]",)),
    ]
    with psycopg.connect(pg_url) as conn:
        found = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'outbox'").fetchone()
        assert found is not None and found[0] < 0  # never analyzed
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for n, (sql, kinds) in enumerate(statements):
            numbered = sql
            for i in range(1, len(kinds) + 1):
                numbered = numbered.replace("%s", f"${i}", 1)
            conn.execute(f"PREPARE settle{n} AS {numbered}")
            cursor = psycopg.ClientCursor(conn)
            values = ("k0", 0, "x", "x") if len(kinds) > 1 else (["x"],)
            casts = ", ".join(f"%s::{kind}" for kind in kinds)
            cursor.execute(f"EXPLAIN EXECUTE settle{n} ({casts})", values)
            plan = "\n".join(r[0] for r in cursor.fetchall())
            # An index scan stops at the first answer; a bitmap gathers the
            # lane's every row on that side of the place first.
            assert (
                "Index Scan using outbox_lane" in plan or "Index Scan Backward using outbox_lane" in plan
            ), plan
            assert "Bitmap Index Scan on outbox_lane" not in plan, plan
