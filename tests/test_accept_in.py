"""accept_in: accepting inside the application's own transaction (SPEC section 12),
on a real SQLite file and a real PostgreSQL server.

The application's connection is the driver's own (sqlite3, psycopg 3), as
an application holds it; the outbox and its worker run beside it.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.rows
import pytest
import trio

from trio_drain import (
    AcceptConflict,
    AcceptOutcome,
    DrainConfig,
    InvalidRequest,
    OutcomeKind,
    SchemaError,
    SendRequest,
    Status,
    StoreError,
    TrioDrainError,
    accept_in,
    open_outbox,
)
from trio_drain._outbox import Outbox
from trio_drain._store._postgres import _accept_in as _accept_in_pg
from trio_drain._store._postgres import _wire

from .conftest import BACKENDS
from .helpers import FakeBroker, Rig, start_server, wait_until

Connection = Any  # sqlite3.Connection or psycopg.Connection[Any]

#: Polls rarely: a row found within the test's wait was found by a wakeup.
IDLE = DrainConfig(poll_interval=30.0, lease=5.0, ack_timeout=2.0, maintenance_interval=30.0)


def request(cid: str = "order-1", payload: bytes = b"order 1 placed", **kw: Any) -> SendRequest:
    return SendRequest(mesh="alpha", target_spec="*", payload=payload, client_message_id=cid, **kw)


class App:
    """The application's side of one back end: its own connections to the
    outbox's database, which holds an `orders` table of its own too."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.target = target
        self.mark = "?" if kind == "sqlite" else "%s"
        conn = self.connect(autocommit=True)
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, what TEXT NOT NULL)")
        conn.close()

    def connect(self, *, autocommit: bool = False) -> Connection:
        """A connection as applications open one: sqlite3's default
        (legacy) transactions, psycopg with autocommit off; or autocommit."""
        if self.kind == "sqlite":  # (some tests hand a connection to a thread)
            return sqlite3.connect(
                self.target, isolation_level=None if autocommit else "DEFERRED", check_same_thread=False
            )
        return psycopg.connect(self.target, autocommit=autocommit)

    def place_order(self, conn: Connection, order_id: int) -> None:
        conn.execute(f"INSERT INTO orders (id, what) VALUES ({self.mark}, 'an order')", (order_id,))

    def orders(self) -> list[int]:
        """Order ids committed, read on a connection of its own."""
        conn = self.connect(autocommit=True)
        try:
            return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id").fetchall()]
        finally:
            conn.close()

    def outbox_rows(self) -> list[tuple[str, str]]:
        """(client_message_id, status) of the committed outbox rows, read on
        a connection of its own."""
        conn = self.connect(autocommit=True)
        try:
            found = conn.execute("SELECT client_message_id, status FROM outbox ORDER BY client_message_id")
            return [(r[0], r[1]) for r in found.fetchall()]
        finally:
            conn.close()


@pytest.fixture(params=BACKENDS)
async def app_and_outbox(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[tuple[App, Outbox]]:
    """An outbox (each back end in turn), its schema made by `open_outbox`,
    and the application beside it."""
    target = str(db_path) if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    async with open_outbox(target) as outbox:
        yield App(request.param, target), outbox


@pytest.fixture
def app(app_and_outbox: tuple[App, Outbox]) -> App:
    return app_and_outbox[0]


@pytest.fixture
def connections(app: App) -> Iterator[Callable[..., Connection]]:
    """`connect` for the test, every connection closed at the end."""
    opened: list[Connection] = []

    def connect(**kw: Any) -> Connection:
        conn = app.connect(**kw)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def accepted(outcome: AcceptOutcome, *, inserted: bool = True) -> bool:
    return (outcome.kind, outcome.code, outcome.inserted) == (OutcomeKind.ACCEPTED_PENDING, 202, inserted)


# -- commit and rollback


async def test_a_rollback_leaves_neither_the_applications_row_nor_the_outbox_row(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections()
    app.place_order(conn, 1)
    assert accepted(accept_in(conn, request()))
    conn.rollback()
    assert app.orders() == []
    assert app.outbox_rows() == []


async def test_a_commit_makes_both_and_a_running_worker_delivers_it(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    app, outbox = app_and_outbox
    async with trio.open_nursery() as nursery:
        broker = FakeBroker()
        worker = await Rig(outbox, nursery, broker, config=IDLE).start()
        conn = connections()
        app.place_order(conn, 1)
        outcome = accept_in(conn, request())
        conn.commit()
        if app.kind == "sqlite":
            worker.wake()  # SPEC 12: at once after wake(), else at the next poll
        # PostgreSQL: the NOTIFY sent in the transaction wakes it at commit.
        await wait_until(lambda: bool(broker.received), seconds=5)
        nursery.cancel_scope.cancel()
    assert [m.client_message_id for m in broker.received] == ["order-1"]
    assert app.orders() == [1]
    row = await outbox.get_by_client_id("order-1")
    assert row is not None
    assert (row.id, row.status, row.mesh, row.payload) == (
        outcome.row_id,
        Status.DONE,
        "alpha",
        b"order 1 placed",
    )
    # The idempotency table is accept's: delivered, the same request is answered from the row.
    again = connections()
    done = accept_in(again, request())
    assert (done.kind, done.code, done.row_id, done.broker_message_id) == (
        OutcomeKind.ACCEPTED_DONE,
        200,
        row.id,
        row.broker_message_id,
    )
    again.rollback()


async def test_nothing_is_visible_to_another_connection_before_commit(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    app, outbox = app_and_outbox
    conn = connections()
    app.place_order(conn, 1)
    accept_in(conn, request())
    assert app.outbox_rows() == []
    assert await outbox.get_by_client_id("order-1") is None
    assert (await outbox.counts())["pending"] == 0
    if app.kind == "postgresql":  # (SQLite's claim, a write, would wait for the caller's write lock)
        assert await outbox.claim(limit=10, lease_ms=5000, max_age_ms=3_600_000, token="t") == []
    conn.commit()
    assert app.outbox_rows() == [("order-1", "pending")]


async def test_the_row_is_the_row_accept_writes(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    """Same validation, fingerprint and columns: accept_in's row and accept's
    row for equal requests differ only in ids and times."""
    _, outbox = app_and_outbox
    conn = connections()
    accept_in(conn, request("in-tx", meta={"b": 1, "a": [2]}, priority="now", ordering_key="lane-1"))
    conn.commit()
    await outbox.accept(request("own-tx", meta={"b": 1, "a": [2]}, priority="now", ordering_key="lane-2"))
    mine, theirs = await outbox.get_by_client_id("in-tx"), await outbox.get_by_client_id("own-tx")
    assert mine is not None and theirs is not None
    different = {"id", "client_message_id", "enqueued_at", "next_attempt_at", "ordering_key"}
    assert {k: v for k, v in mine.to_dict().items() if k not in different} == {
        k: v for k, v in theirs.to_dict().items() if k not in different
    }
    assert (mine.ordering_key, mine.request_fingerprint) == ("lane-1", theirs.request_fingerprint)


async def test_rows_of_an_ordering_lane_accepted_in_a_transaction_keep_their_lane(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    """The lane's bookkeeping is the shared insert's: the lane's first row
    may go, the next waits behind it."""
    _, outbox = app_and_outbox
    conn = connections()
    accept_in(conn, request("first", ordering_key="customer-7"))
    accept_in(conn, request("second", payload=b"next", ordering_key="customer-7"))
    accept_in(conn, request("alone", payload=b"other", ordering_key="customer-8"))
    conn.commit()
    claimed = await outbox.claim(limit=10, lease_ms=5000, max_age_ms=3_600_000, token="t")
    assert sorted(r.client_message_id for r in claimed) == ["alone", "first"]


# -- refused requests leave the transaction usable


async def test_a_conflicting_request_raises_and_the_transactions_earlier_work_still_commits(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    app, outbox = app_and_outbox
    first = await outbox.accept(request())
    conn = connections()
    app.place_order(conn, 1)
    accept_in(conn, request("order-2"))
    with pytest.raises(AcceptConflict) as caught:
        accept_in(conn, request(payload=b"another body"))
    conflict = caught.value.outcome
    assert (conflict.kind, conflict.code, conflict.reason, conflict.row_id) == (
        OutcomeKind.CONFLICT,
        409,
        "outbox_pending_fingerprint_mismatch",
        first.row_id,
    )
    assert isinstance(caught.value, TrioDrainError)
    app.place_order(conn, 2)  # still usable
    conn.commit()
    assert app.orders() == [1, 2]
    assert app.outbox_rows() == [("order-1", "pending"), ("order-2", "pending")]


async def test_a_dead_rows_id_is_a_conflict_as_for_accept(
    app_and_outbox: tuple[App, Outbox], connections: Callable[..., Connection]
) -> None:
    _, outbox = app_and_outbox
    row = await outbox.accept(request())
    assert row.row_id is not None
    await outbox.drop(row.row_id)
    conn = connections()
    with pytest.raises(AcceptConflict) as caught:
        accept_in(conn, request())
    assert caught.value.outcome.reason == "outbox_aborted_fingerprint_match"
    assert "outbox_aborted_fingerprint_match" in str(caught.value)
    conn.rollback()


async def test_an_invalid_request_raises_and_the_transactions_earlier_work_still_commits(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections()
    app.place_order(conn, 1)
    with pytest.raises(InvalidRequest, match="priority"):
        accept_in(conn, request(priority="urgent"))
    with pytest.raises(InvalidRequest, match="SendRequest"):
        accept_in(conn, "not a request")  # type: ignore[arg-type]
    assert accepted(accept_in(conn, request()))
    conn.commit()
    assert app.orders() == [1]
    assert app.outbox_rows() == [("order-1", "pending")]


async def test_a_database_error_inside_accept_in_rolls_back_to_its_savepoint_only(
    app: App, connections: Callable[..., Connection]
) -> None:
    """Not only refusals: a statement that fails inside accept_in (here a
    trigger of the application's) leaves the transaction usable, even on
    PostgreSQL, where a failed statement would otherwise doom it."""
    setup = connections(autocommit=True)
    if app.kind == "sqlite":
        setup.execute(
            "CREATE TRIGGER no_spam BEFORE INSERT ON outbox WHEN NEW.client_message_id LIKE 'spam%'"
            " BEGIN SELECT RAISE(ABORT, 'no spam'); END"
        )
    else:
        setup.execute(
            "CREATE FUNCTION no_spam() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.client_message_id LIKE 'spam%' THEN RAISE EXCEPTION 'no spam'; END IF;"
            " RETURN NEW; END $$"
        )
        setup.execute(
            "CREATE TRIGGER no_spam BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION no_spam()"
        )
    conn = connections()
    app.place_order(conn, 1)
    with pytest.raises(StoreError, match="no spam") as caught:
        accept_in(conn, request("spam-1"))
    assert not isinstance(caught.value, SchemaError)
    accept_in(conn, request())
    conn.commit()
    assert app.orders() == [1]
    assert app.outbox_rows() == [("order-1", "pending")]


async def test_the_same_id_twice_in_one_transaction_is_one_row(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections()
    first = accept_in(conn, request())
    again = accept_in(conn, request())
    assert accepted(first) and accepted(again, inserted=False)
    assert again.row_id == first.row_id
    conn.commit()
    assert app.outbox_rows() == [("order-1", "pending")]


async def test_an_id_is_minted_when_the_request_has_none(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections()
    outcome = accept_in(conn, SendRequest(payload=b"hi"))
    conn.commit()
    assert app.outbox_rows() == [(outcome.client_message_id, "pending")]


# -- concurrent transactions


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
async def test_concurrent_transactions_accepting_one_id_make_one_row(
    app: App, connections: Callable[..., Connection], first_ends: str
) -> None:
    """The second waits for the first (SQLite's write lock, PostgreSQL's
    unique index), then is answered by the idempotency table: from the
    first's row if it committed, with a row of its own if it rolled back."""
    first, second = connections(), connections()
    if app.kind == "sqlite":
        first.execute("BEGIN IMMEDIATE")
    mine = accept_in(first, request())
    outcomes: list[AcceptOutcome] = []

    def other() -> None:
        outcomes.append(accept_in(second, request()))
        second.commit()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, other)
        await trio.sleep(0.3)
        assert outcomes == []  # waiting for the first
        getattr(first, first_ends)()
    (theirs,) = outcomes
    if first_ends == "commit":
        assert accepted(theirs, inserted=False) and theirs.row_id == mine.row_id
    else:
        assert accepted(theirs) and theirs.row_id != mine.row_id
    assert app.outbox_rows() == [("order-1", "pending")]


async def test_concurrent_transactions_with_different_requests_under_one_id_conflict(
    app: App, connections: Callable[..., Connection]
) -> None:
    first, second = connections(), connections()
    if app.kind == "sqlite":
        first.execute("BEGIN IMMEDIATE")
    accept_in(first, request())
    errors: list[BaseException] = []

    def other() -> None:
        try:
            accept_in(second, request(payload=b"a different order"))
        except AcceptConflict as exc:
            errors.append(exc)
        second.commit()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, other)
        await trio.sleep(0.3)
        first.commit()
    (error,) = errors
    assert isinstance(error, AcceptConflict)
    assert error.outcome.reason == "outbox_pending_fingerprint_mismatch"
    assert app.outbox_rows() == [("order-1", "pending")]


# -- which transaction is joined


async def test_a_connection_in_autocommit_mode_with_no_transaction_is_refused(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections(autocommit=True)
    with pytest.raises(InvalidRequest, match="autocommit mode"):
        accept_in(conn, request())
    assert app.outbox_rows() == []


async def test_a_transaction_begun_explicitly_in_autocommit_mode_is_joined(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections(autocommit=True)
    if app.kind == "sqlite":
        conn.execute("BEGIN IMMEDIATE")
        accept_in(conn, request())
        assert app.outbox_rows() == []
        conn.execute("ROLLBACK")
        assert app.outbox_rows() == []
    else:
        assert isinstance(conn, psycopg.Connection)
        with conn.transaction():
            accept_in(conn, request())
            assert app.outbox_rows() == []
        assert app.outbox_rows() == [("order-1", "pending")]


async def test_with_no_transaction_open_yet_the_drivers_implicit_one_is_joined(
    app: App, connections: Callable[..., Connection]
) -> None:
    """sqlite3 (its default, legacy mode) and psycopg (autocommit off) open
    a transaction before a write; accept_in as the first statement joins
    the one the driver would open, which the caller then commits."""
    conn = connections()
    if app.kind == "sqlite":
        assert not conn.in_transaction
    else:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    accept_in(conn, request())
    app.place_order(conn, 1)
    assert app.outbox_rows() == []
    conn.commit()
    assert app.orders() == [1]
    assert app.outbox_rows() == [("order-1", "pending")]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3's autocommit attribute is Python 3.12+")
async def test_sqlite3_autocommit_attribute(db_path: Path) -> None:
    async with open_outbox(db_path):
        pass
    connect: Any = sqlite3.connect  # (typeshed for 3.11 has no autocommit)
    on = connect(db_path, autocommit=True)
    with pytest.raises(InvalidRequest, match="autocommit=True"):
        accept_in(on, request())
    on.execute("BEGIN")
    accept_in(on, request())
    on.execute("ROLLBACK")
    off = connect(db_path, autocommit=False)
    accept_in(off, request())
    off.commit()
    assert [r[0] for r in off.execute("SELECT client_message_id FROM outbox")] == ["order-1"]
    on.close()
    off.close()


async def test_a_failed_postgresql_transaction_is_refused(pg_url: str) -> None:
    async with open_outbox(pg_url):
        pass
    with psycopg.connect(pg_url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(InvalidRequest, match="roll it back"):
            accept_in(conn, request())
        conn.rollback()
        accept_in(conn, request())


async def test_a_closed_connection_or_another_kind_of_object_is_refused(pg_url: str, db_path: Path) -> None:
    async with open_outbox(pg_url):
        pass
    conn = psycopg.connect(pg_url)
    conn.close()
    with pytest.raises(InvalidRequest, match="closed"):
        accept_in(conn, request())
    closed = sqlite3.connect(db_path)
    closed.close()
    with pytest.raises(InvalidRequest, match="closed"):
        accept_in(closed, request())
    with pytest.raises(InvalidRequest, match=r"sqlite3\.Connection or a psycopg"):
        accept_in(object(), request())  # type: ignore[arg-type]


# -- the caller's connection is left as it was


async def test_the_callers_row_factory_is_used_around_it_and_left_alone(
    app: App, connections: Callable[..., Connection]
) -> None:
    conn = connections()
    factory: object
    if app.kind == "sqlite":
        factory = conn.row_factory = sqlite3.Row
    else:
        factory = conn.row_factory = psycopg.rows.dict_row
    accept_in(conn, request())
    assert accepted(accept_in(conn, request()), inserted=False)  # read the row back through it
    assert conn.row_factory is factory
    conn.rollback()


async def test_without_the_outboxs_schema_it_says_to_open_the_outbox_first(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO orders VALUES (1)")
    with pytest.raises(SchemaError, match="open_outbox"):
        accept_in(conn, SendRequest(payload=b"hi"))
    conn.commit()  # still usable
    assert conn.execute("SELECT id FROM orders").fetchall() == [(1,)]
    conn.close()
    with psycopg.connect(request.getfixturevalue("pg_url")) as pg:
        pg.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        pg.execute("INSERT INTO orders VALUES (1)")
        with pytest.raises(SchemaError, match="open_outbox"):
            accept_in(pg, SendRequest(payload=b"hi"))
        pg.commit()
        assert pg.execute("SELECT id FROM orders").fetchall() == [(1,)]


# -- PostgreSQL: one round trip on the caller's connection


@pytest.fixture
async def pg_app(pg_url: str) -> AsyncIterator[App]:
    """The application beside a PostgreSQL outbox."""
    async with open_outbox(pg_url):
        yield App("postgresql", pg_url)


@pytest.fixture
def pg_connect(pg_app: App) -> Iterator[Callable[[], psycopg.Connection[Any]]]:
    """The application's psycopg connections (autocommit off), closed at the end."""
    opened: list[psycopg.Connection[Any]] = []

    def connect() -> psycopg.Connection[Any]:
        opened.append(psycopg.connect(pg_app.target))
        return opened[-1]

    yield connect
    for conn in opened:
        conn.close()


def round_trips(conn: psycopg.Connection[Any], call: Callable[[], object]) -> int:
    """How many times `call` sends the server something and then waits for
    its answer on `conn`, read from libpq's trace of the protocol."""
    with tempfile.TemporaryFile(mode="w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        try:
            call()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        directions = [line.split("\t", 1)[0] for line in trace.read().splitlines() if line.strip()]
    return sum(1 for i, d in enumerate(directions) if d == "F" and (i == 0 or directions[i - 1] != "F"))


async def test_on_postgresql_accept_in_is_one_round_trip_savepoint_and_release_included(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    """The savepoint, the insert (its NOTIFY inside), the release: one
    pipeline. A plain INSERT is one round trip too; four statements one
    after the other were four."""
    conn = pg_connect()
    pg_app.place_order(conn, 1)
    assert round_trips(conn, lambda: pg_app.place_order(conn, 2)) == 1
    assert round_trips(conn, lambda: accept_in(conn, request())) == 1
    assert round_trips(conn, lambda: accept_in(conn, request("order-2", ordering_key="lane"))) == 1
    # Its id taken (here by itself): a second round trip reads the row holding it.
    assert round_trips(conn, lambda: accept_in(conn, request())) == 2
    conn.commit()
    assert pg_app.outbox_rows() == [("order-1", "pending"), ("order-2", "pending")]


async def test_on_postgresql_a_transaction_not_begun_yet_is_begun_in_the_same_round_trip_as_psycopg_would(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    conn = pg_connect()
    conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    status = conn.info.transaction_status
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert round_trips(conn, lambda: accept_in(conn, request())) == 1
    status = conn.info.transaction_status
    assert status == psycopg.pq.TransactionStatus.INTRANS
    assert conn.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
    conn.rollback()
    assert pg_app.outbox_rows() == []
    conn.read_only = True  # the insert fails; the transaction stays usable
    with pytest.raises(StoreError, match="read-only transaction"):
        accept_in(conn, request())
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.rollback()


@pytest.mark.parametrize("dropped_by", ["DEALLOCATE ALL", "psycopg at a rollback", "another session"])
async def test_on_postgresql_statements_dropped_behind_its_back_are_prepared_again(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]], dropped_by: str
) -> None:
    """accept_in prepares its statements on the caller's connection once.
    psycopg deallocates every prepared statement at a rollback once it has
    prepared some of its own; DISCARD ALL or a pooler handing the caller
    another server session lose them too; and a session may hold them
    although this process does not know it (the pooler again)."""
    conn = pg_connect()
    conn.prepare_threshold = 0  # psycopg prepares everything it runs
    accept_in(conn, request("order-1"))
    conn.commit()
    if dropped_by == "DEALLOCATE ALL":
        conn.execute("DEALLOCATE ALL")
    elif dropped_by == "psycopg at a rollback":
        pg_app.place_order(conn, 1)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (1,)  # its new one
    else:
        _accept_in_pg._PREPARED.pop(conn)  # as if the pooler handed over a session that has them
    pg_app.place_order(conn, 2)
    assert accepted(accept_in(conn, request("order-2")))
    assert accepted(accept_in(conn, request("order-3")))
    conn.commit()
    assert pg_app.orders() == [2]
    assert pg_app.outbox_rows() == [("order-1", "pending"), ("order-2", "pending"), ("order-3", "pending")]


async def test_on_postgresql_ctrl_c_while_it_waits_leaves_nothing_and_the_connection_usable(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As psycopg does: the server's statement is cancelled, the exchange
    read to its end, then KeyboardInterrupt raised. Here the accept waits
    for its lane's lock, which another session holds, and the first wait on
    the socket is interrupted once the server is surely waiting (inside the
    savepoint: a cancel that came before the savepoint would fail the
    caller's transaction, as any cancelled statement does)."""
    conn = pg_connect()
    pg_app.place_order(conn, 1)
    holder = pg_connect()
    holder.execute("SELECT pg_advisory_lock(hashtextextended('lane', 1953653108))")
    block = _wire._block
    interrupted: list[int] = []

    def interrupt_once(fd: int, wait: str) -> None:
        if not interrupted:
            interrupted.append(1)
            time.sleep(0.3)
            raise KeyboardInterrupt
        block(fd, wait)

    monkeypatch.setattr(_wire, "_block", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        accept_in(conn, request(ordering_key="lane"))
    monkeypatch.undo()
    assert interrupted
    holder.execute("SELECT pg_advisory_unlock(hashtextextended('lane', 1953653108))")
    holder.rollback()
    assert accepted(accept_in(conn, request("order-2")))
    conn.commit()
    assert pg_app.orders() == [1]
    assert pg_app.outbox_rows() == [("order-2", "pending")]


async def test_on_postgresql_ctrl_c_before_the_savepoint_is_in_cancels_nothing_until_it_is(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C at the very start of the round trip: a cancel then could
    land on the SAVEPOINT and fail the caller's transaction, so it waits for
    the savepoint's answer, then cancels the accept waiting for its lane."""
    conn = pg_connect()
    pg_app.place_order(conn, 1)  # the transaction is open: the savepoint comes first
    holder = pg_connect()
    holder.execute("SELECT pg_advisory_lock(hashtextextended('lane', 1953653108))")
    # Should the savepoint's answer never come back while the accept waits
    # (the server holds answers until a pipeline's end unless asked), the
    # lock goes after a while, and the cancel comes too late: a failure, not a hang.
    letting_go = threading.Timer(10, holder.execute, ("SELECT pg_advisory_unlock_all()",))
    letting_go.start()
    block, cancel = _wire._block, _wire.Wire.cancel
    interrupted: list[int] = []
    answered_at_cancel: list[int] = []

    def interrupt_at_once(fd: int, wait: str) -> None:
        if not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        block(fd, wait)

    def spy(self: _wire.Wire) -> None:
        answered_at_cancel.append(self.answered)
        cancel(self)

    monkeypatch.setattr(_wire, "_block", interrupt_at_once)
    monkeypatch.setattr(_wire.Wire, "cancel", spy)
    with pytest.raises(KeyboardInterrupt):
        accept_in(conn, request(ordering_key="lane"))
    monkeypatch.undo()
    letting_go.cancel()
    letting_go.join()
    assert answered_at_cancel == [1]  # once, with the savepoint's answer in and nothing after it
    holder.execute("SELECT pg_advisory_unlock_all()")
    holder.rollback()
    assert accepted(accept_in(conn, request("order-2")))
    conn.commit()
    assert pg_app.orders() == [1]
    assert pg_app.outbox_rows() == [("order-2", "pending")]


def test_a_blocking_exchange_interrupted_cancels_once_the_answers_it_must_wait_for_are_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mechanism alone, on a stand-in exchange: a Ctrl-C at the first
    wait sends the cancel only after `cancel_after` answers, then the
    exchange is read to its end and KeyboardInterrupt raised."""
    w = _wire.Wire.__new__(_wire.Wire)
    w._pg = type("StandIn", (), {"socket": -1})()
    w.answered = 0
    seen: list[int] = []
    monkeypatch.setattr(w, "cancel", lambda: seen.append(w.answered))
    waits = iter([KeyboardInterrupt, None, None, None])

    def block(fd: int, wait: str) -> None:
        interrupt = next(waits)
        if interrupt is not None:
            raise interrupt

    monkeypatch.setattr(_wire, "_block", block)

    def steps() -> _wire.Steps[str]:
        for _ in range(3):
            yield _wire.READ
            w.answered += 1
        return "done"

    with pytest.raises(KeyboardInterrupt):
        w.drive_blocking(steps(), cancel_after=2)
    assert seen == [2]


async def test_on_postgresql_in_psycopgs_pipeline_mode_it_joins_the_transaction_too(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    conn = pg_connect()
    with conn.pipeline():
        pg_app.place_order(conn, 1)
        assert accepted(accept_in(conn, request()))
        with pytest.raises(AcceptConflict):
            accept_in(conn, request(payload=b"another body"))
        pg_app.place_order(conn, 2)
    conn.commit()
    assert pg_app.orders() == [1, 2]
    assert pg_app.outbox_rows() == [("order-1", "pending")]


async def test_on_postgresql_a_connection_busy_with_a_copy_is_refused(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    conn = pg_connect()
    with conn.cursor().copy("COPY orders (id, what) FROM STDIN") as copy:
        with pytest.raises(InvalidRequest, match="busy with another statement"):
            accept_in(conn, request())
        copy.write_row((1, "an order"))
    conn.commit()
    assert pg_app.orders() == [1]
    assert pg_app.outbox_rows() == []


# -- the tutorial's program


async def test_the_tutorials_orders_program_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "orders", Path(__file__).parent.parent / "docs" / "tutorial" / "orders.py"
    )
    assert spec is not None and spec.loader is not None
    orders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orders)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, open_mode=True)
        with trio.fail_after(20):
            await orders.main(server.url, str(tmp_path / "shop.db"))
        nursery.cancel_scope.cancel()
    out = capsys.readouterr().out
    assert "order 1001 placed; its message: accepted_pending 202" in out
    assert "order 1002 failed" in out
    assert "order-placed-1001: done as" in out
    assert "order-placed-1002 in the outbox: None" in out


@pytest.mark.parametrize(
    "level", [psycopg.IsolationLevel.REPEATABLE_READ, psycopg.IsolationLevel.SERIALIZABLE]
)
async def test_on_postgresql_a_lane_row_is_refused_outside_read_committed_and_nothing_is_left(
    pg_app: App, pg_connect: Callable[[], psycopg.Connection[Any]], level: psycopg.IsolationLevel
) -> None:
    # A snapshot taken at the transaction's first statement could see an
    # empty lane another transaction has just filled, and release a second
    # row of it: a lane's row is refused there; a row without a lane is not.
    conn = pg_connect()
    conn.isolation_level = level
    pg_app.place_order(conn, 1)
    with pytest.raises(InvalidRequest, match="READ COMMITTED"):
        accept_in(conn, request("order-1", ordering_key="lane"))
    accept_in(conn, request("order-1"))  # the transaction is still usable
    conn.commit()
    assert pg_app.outbox_rows() == [("order-1", "pending")]
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    pg_app.place_order(conn, 2)
    accept_in(conn, request("order-2", ordering_key="lane"))
    conn.commit()
    assert pg_app.outbox_rows() == [("order-1", "pending"), ("order-2", "pending")]


async def test_on_postgresql_the_stores_own_transactions_are_read_committed_whatever_the_default(
    pg_url: str,
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        database = admin.info.dbname
        admin.execute(f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'serializable'")
    try:
        async with open_outbox(pg_url) as ob:
            for i in range(3):
                await ob.accept(request(f"m-{i}", ordering_key="lane"))
            rows = await ob.claim(limit=10, lease_ms=60_000, max_age_ms=10**12, token="t")
            assert [r.client_message_id for r in rows] == ["m-0"]
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_isolation')
