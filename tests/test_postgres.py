"""What only the PostgreSQL back end does: many connections and processes on
one outbox, LISTEN/NOTIFY wakeups, surviving a server restart.

The store and worker tests already run against PostgreSQL too (see the
`outbox_target` fixture); these cover what SQLite has no counterpart for.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from trio_drain import (
    AcceptOutcome,
    BrokerRegistry,
    ConfigError,
    DrainConfig,
    DrainWorker,
    Outbox,
    SchemaError,
    SendRequest,
    StoreUnavailable,
    open_outbox,
)
from trio_drain._identity import generate_secret_key
from trio_drain._store._postgres import PostgresBackend

from .helpers import FakeBroker, wait_until
from .pg import PostgresServer, free_port
from .procs import SHORT_LEASES, Broker, counts, fill, start_run, stop_all, wait_for_done, write_config

FAST = DrainConfig(poll_interval=30.0, lease=5.0, ack_timeout=2.0, maintenance_interval=0.2,
                   max_inflight=16, batch_size=16, backoff_base=0.01, backoff_cap=0.05)


def req(cid: str, **kw: Any) -> SendRequest:
    fields: dict[str, Any] = {"mesh": "alpha", "target_spec": "#t", "payload": cid.encode(), "client_message_id": cid}
    fields.update(kw)
    return SendRequest(**fields)


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
        assert conn.execute("SELECT version FROM trio_drain_schema").fetchall() == [(1,)]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with open_outbox(pg_url):
        pass
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE trio_drain_schema SET version = 99")
    with pytest.raises(SchemaError, match="upgrade"):
        async with open_outbox(pg_url):
            pass


async def test_the_claim_query_uses_the_claim_index(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(2000)])
    with psycopg.connect(pg_url) as conn:
        conn.execute("ANALYZE outbox")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= 1e13"
            " AND enqueued_at >= 0 ORDER BY priority_rank, enqueued_at LIMIT 128 FOR UPDATE SKIP LOCKED"))
    assert "outbox_claim" in plan and "Sort" not in plan, plan


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
            while rows := await ob.claim(limit=7, lease_ms=60_000, max_age_ms=10**12, token=f"t{n}"):
                claimed.extend(r.client_message_id for r in rows)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(claimer, n)
    assert len(claimed) == 600
    assert len(set(claimed)) == 600


async def test_a_notify_from_another_process_wakes_an_idle_worker_at_once(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob, trio.open_nursery() as nursery:
        registry, broker = BrokerRegistry(), FakeBroker()
        registry.set_mesh("alpha", broker)
        await nursery.start(DrainWorker(ob, registry, FAST).run)  # polls every 30 s
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
        registry, broker = BrokerRegistry(), FakeBroker(delay=0.01)
        registry.set_mesh("alpha", broker)
        await nursery.start(DrainWorker(ob, registry, config).run)
        await wait_until(lambda: len(broker.accepted) >= 50, seconds=10)
        await trio.to_thread.run_sync(own_server.stop)

        with trio.fail_after(10):  # refused at once, not hung
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await ob.accept(req("during-outage"))
        await trio.sleep(0.5)  # the worker meets the outage too
        await trio.to_thread.run_sync(own_server.start)
        await ob.accept(req("after-restart"))

        async def all_done() -> bool:
            try:
                return (await ob.counts())["done"] == 401
            except StoreUnavailable:
                return False

        await wait_until(all_done, seconds=30)
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
        assert ledger.execute("SELECT count(*), count(DISTINCT client_message_id) FROM accepted").fetchone() == (n, n)
    finally:
        ledger.close()
