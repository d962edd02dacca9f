"""The SQLite back end: file handling, schema, migration, claims and fencing."""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_drain import (
    AcceptOutcome,
    ConfigError,
    CorruptDatabase,
    Outbox,
    OutcomeKind,
    SchemaError,
    SendRequest,
    Status,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    open_outbox,
)
from trio_drain._outbox import parse_target
from trio_drain._store._base import SCHEMA_VERSION, RouteFilter
from trio_drain._store._sqlite._schema import MIN_SQLITE
from trio_drain._store._sqlite._statements import claim_statement
from trio_drain._validate import prepare_row

from . import builders
from .builders import BIG
from .helpers import FakeClock, wait_until

#: The requests here are broadcasts.
req = functools.partial(builders.req, target_spec="*")


@pytest.fixture
async def sqlite_outbox(db_path: Path) -> AsyncIterator[Outbox]:
    async with open_outbox(db_path, durability="normal") as ob:
        yield ob


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the file ------------------------------------------------------------------


async def test_new_file_is_created_0600_in_wal_mode_with_full_sync(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept(req("m-1"))
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{db_path}-wal").st_mode) == 0o600
        writer = ob.backend._writer  # type: ignore[attr-defined]
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_durability_normal_opts_down_to_synchronous_normal(db_path: Path) -> None:
    async with open_outbox(db_path, durability="normal") as ob:
        await ob.accept(req("m-1"))
        assert ob.backend._writer.execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]


async def test_unknown_durability_is_refused(db_path: Path) -> None:
    with pytest.raises(StoreError, match="durability"):
        async with open_outbox(db_path, durability="paranoid"):  # type: ignore[arg-type]
            pass


async def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite file at all" * 100)
    before = digest(db_path)
    with pytest.raises(CorruptDatabase):
        async with open_outbox(db_path):
            pass
    assert digest(db_path) == before
    assert not Path(f"{db_path}-wal").exists()


async def test_a_corrupted_database_fails_its_integrity_check_and_is_left_untouched(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept_many([req(f"m-{i}", payload=os.urandom(500)) for i in range(400)])
    # Checkpointed and closed; now scribble over a page in the middle.
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    data[10 * page : 10 * page + 200] = b"\xff" * 200
    db_path.write_bytes(bytes(data))
    before = digest(db_path)
    with pytest.raises(CorruptDatabase):
        async with open_outbox(db_path):
            pass
    assert digest(db_path) == before


async def test_missing_folder_and_directory_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        async with open_outbox(tmp_path / "nope" / "o.db"):
            pass
    with pytest.raises(StoreError, match="directory"):
        async with open_outbox(tmp_path):
            pass


async def test_an_sqlite_too_old_for_the_sql_is_refused_at_open_and_nothing_is_created(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim needs RETURNING (3.35); an older library used to open the
    # outbox and fail every claim, which the worker retried forever.
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(StoreError, match=r"version 3\.34\.1; trio-drain needs 3\.35\.5 or newer"):
        async with open_outbox(db_path):
            pass
    assert not db_path.exists()
    monkeypatch.undo()
    assert sqlite3.sqlite_version_info >= MIN_SQLITE
    async with open_outbox(db_path) as ob:  # the real library is new enough
        assert (await ob.accept(req("m-1"))).inserted


def test_targets_parse_paths_and_urls() -> None:
    assert parse_target("o.db") == ("sqlite", "o.db")
    assert parse_target("sqlite:///rel/o.db") == ("sqlite", "rel/o.db")
    assert parse_target("sqlite:////abs/o.db") == ("sqlite", "/abs/o.db")
    assert parse_target("postgresql://u@h/db")[0] == "postgresql"
    for bad in ("mysql://x", "sqlite://o.db", ""):
        with pytest.raises(ConfigError):
            parse_target(bad)


async def test_using_a_closed_outbox_is_a_clear_error(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        pass
    with pytest.raises(StoreClosed):
        await ob.accept(req("m-1"))


# -- schema and migration ----------------------------------------------------------------

SEED_SCHEMA = """
CREATE TABLE outbox (
  id TEXT PRIMARY KEY, client_message_id TEXT NOT NULL UNIQUE, request_fingerprint BLOB NOT NULL,
  payload BLOB NOT NULL, enqueued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending','inflight','done','dead','aborted')),
  last_error TEXT, delivered_at INTEGER, broker_message_id TEXT, aborted_at INTEGER, aborted_by TEXT,
  superseded_by TEXT, mesh TEXT, target_spec TEXT, nonce TEXT, ciphertext TEXT, priority TEXT,
  sender_session_pubkey TEXT
);
CREATE TABLE members (id TEXT);
PRAGMA user_version = 7;
"""


def write_seed_db(path: Path, now: int) -> None:
    """An outbox.db as the seed's daemon leaves it: its table, no lease column,
    legacy rows with null routing, one row stuck inflight by a crash."""
    conn = sqlite3.connect(path)
    conn.executescript(SEED_SCHEMA)
    rows = [
        (
            "s1",
            "legacy-1",
            b"\x01" * 32,
            b"hello",
            now - 5000,
            0,
            now - 5000,
            "pending",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        (
            "s2",
            "legacy-2",
            b"\x02" * 32,
            b"stuck",
            now - 4000,
            1,
            now + 30000,
            "inflight",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        (
            "s3",
            "routed-3",
            b"\x03" * 32,
            b"r",
            now - 3000,
            0,
            now - 3000,
            "pending",
            None,
            None,
            None,
            None,
            None,
            None,
            "alpha",
            "#t",
            "bm9uY2U=",
            "Y3Q=",
            "now",
            None,
        ),
        (
            "s4",
            "done-4",
            b"\x04" * 32,
            b"d",
            now - 2000,
            1,
            now - 2000,
            "done",
            None,
            now - 1000,
            "b-4",
            None,
            None,
            None,
            "alpha",
            "*",
            None,
            None,
            "next",
            None,
        ),
    ]
    conn.executemany("INSERT INTO outbox VALUES (" + ",".join("?" * 20) + ")", rows)
    conn.commit()
    conn.close()


async def test_a_seed_database_migrates_in_place_and_keeps_every_row(db_path: Path, clock: FakeClock) -> None:
    write_seed_db(db_path, clock.now)
    async with open_outbox(db_path, clock=clock) as ob:
        counts = await ob.counts()
        assert counts == {"pending": 2, "inflight": 1, "done": 1, "dead": 0, "aborted": 0}
        legacy = await ob.get("s1")
        assert legacy is not None and legacy.mesh is None and legacy.lease_expires_at is None
        # The row the seed left inflight forever has no lease: it is recovered at once.
        assert await ob.recover_expired_leases(max_attempts=25) == 1
        stuck = await ob.get("s2")
        assert stuck is not None and stuck.status is Status.PENDING
        rows = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="t")
        assert [r.id for r in rows] == ["s3", "s1", "s2"]  # 'now' first, then by enqueue time
        # New rows go into the migrated table with every column they do not set NULL.
        assert (await ob.accept(req("after-migration"))).inserted
        fresh = await ob.get_by_client_id("after-migration")
        assert fresh is not None and (fresh.status, fresh.attempts, fresh.mesh) == (
            Status.PENDING,
            0,
            "alpha",
        )
        assert (fresh.last_error, fresh.delivered_at, fresh.lease_token, fresh.superseded_by) == (None,) * 4
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT version FROM trio_drain_schema").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 7  # the daemon's own, untouched
    assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == 0
    conn.close()


async def test_reopening_a_migrated_database_is_a_no_op(db_path: Path, clock: FakeClock) -> None:
    write_seed_db(db_path, clock.now)
    async with open_outbox(db_path, clock=clock):
        pass
    async with open_outbox(db_path, clock=clock) as ob:
        assert sum((await ob.counts()).values()) == 4


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    async with open_outbox(db_path):
        pass
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE trio_drain_schema SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="upgrade"):
        async with open_outbox(db_path):
            pass


# -- SQLite specifics of claims ---------------------------------------------------


async def test_the_claim_query_uses_the_claim_index(sqlite_outbox: Outbox) -> None:
    conn: sqlite3.Connection = sqlite_outbox.backend._reader  # type: ignore[attr-defined]
    # The claim as the store runs it: its terms come from the state machine.
    sql, args = claim_statement(1, 5, 1000, 10**12, "t", RouteFilter())
    plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
    assert "outbox_claim" in plan and "TEMP B-TREE" not in plan


# -- the writer thread's group commit ---------------------------------------------------


async def test_an_accept_cancelled_while_a_batch_runs_is_withdrawn_and_writes_nothing(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        committer = ob.backend._committer  # type: ignore[attr-defined]
        release = threading.Event()
        async with trio.open_nursery() as nursery:
            # Hold the writer thread busy, so the next accept has to queue.
            nursery.start_soon(
                functools.partial(committer.submit, lambda conn: release.wait(10), durable=False)
            )
            await wait_until(lambda: committer._busy)
            with trio.move_on_after(0.05) as scope:
                await ob.accept(req("queued-then-cancelled"))
            assert scope.cancelled_caught
            release.set()
        assert await ob.get_by_client_id("queued-then-cancelled") is None
        assert (await ob.accept(req("queued-then-cancelled"))).inserted  # the id was never consumed


async def test_a_write_already_running_is_never_abandoned_on_cancel(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        committer = ob.backend._committer  # type: ignore[attr-defined]
        running = threading.Event()

        def slow_insert(conn: sqlite3.Connection) -> None:
            running.set()
            time.sleep(0.2)
            conn.execute("CREATE TABLE written_anyway (x)")

        with trio.move_on_after(0.05) as scope:
            await committer.submit(slow_insert, durable=True)
            await trio.lowlevel.checkpoint()  # the cancellation lands here, after the write
        assert scope.cancelled_caught and running.is_set()
        # The caller left only after the write: it is there now, not later.
        conn = sqlite3.connect(db_path)
        assert conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'written_anyway'"
        ).fetchone() == (1,)
        conn.close()


async def test_callers_woken_together_share_the_next_commit(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        committer = ob.backend._committer  # type: ignore[attr-defined]

        async def caller(k: int) -> None:
            for i in range(5):
                await ob.accept(req(f"c-{k}-{i}"))

        before = committer.batches
        async with trio.open_nursery() as nursery:
            for k in range(32):
                nursery.start_soon(caller, k)
        # 160 accepts; callers woken by one commit join the next one together.
        assert committer.batches - before <= 20


async def test_leaders_cancelled_mid_write_still_hand_on_every_later_batch(db_path: Path) -> None:
    # The caller that sends a batch waits for the writer's doorbell, then
    # wakes the rest and sends the next batch. Cancel two leaders in a row
    # while their writes run (the second was handed the lead while parked):
    # every queued write still happens, and each cancelled caller leaves
    # only after its own write.
    with trio.fail_after(10):  # a caller left parked would hang the test
        async with open_outbox(db_path) as ob:
            committer = ob.backend._committer  # type: ignore[attr-defined]
            gates = [threading.Event(), threading.Event()]
            written: list[str] = []

            def held(name: str, gate: threading.Event) -> object:
                def op(conn: sqlite3.Connection) -> None:
                    gate.wait(10)
                    conn.execute(f"CREATE TABLE {name} (x)")
                    written.append(name)

                return op

            async def cancelled_leader(name: str, gate: threading.Event) -> None:
                with trio.CancelScope() as scope:
                    scopes[name] = scope
                    await committer.submit(held(name, gate), durable=False)
                    left_after[name] = list(written)
                    await trio.lowlevel.checkpoint()  # the cancellation lands here
                assert scope.cancelled_caught

            scopes: dict[str, trio.CancelScope] = {}
            left_after: dict[str, list[str]] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancelled_leader, "first", gates[0])
                await wait_until(lambda: committer._busy)
                nursery.start_soon(
                    cancelled_leader, "second", gates[1]
                )  # queued: it will lead the next batch
                await wait_until(lambda: "second" in scopes and len(committer._queue) == 1)
                scopes["first"].cancel()
                gates[0].set()
                await wait_until(lambda: written == ["first"] and committer._busy)
                nursery.start_soon(ob.accept, req("third"))  # queued behind the second batch
                await wait_until(lambda: len(committer._queue) == 1)
                scopes["second"].cancel()
                gates[1].set()
            assert written == ["first", "second"]
            assert left_after == {"first": ["first"], "second": ["first", "second"]}
            assert (await ob.get_by_client_id("third")) is not None
            assert committer._idle.is_set() and not committer._busy


@pytest.mark.parametrize("kind", ["eventfd", "socketpair"])
async def test_the_writers_doorbell_wakes_its_waiter_once_per_ring(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_drain._store._doorbell import Doorbell as _Doorbell

    if kind == "socketpair":  # what other systems than Linux get
        monkeypatch.delattr(os, "eventfd")
    elif not hasattr(os, "eventfd"):
        pytest.skip("no eventfd on this system")
    bell = _Doorbell()
    try:
        with trio.move_on_after(0.05) as scope:
            await bell.wait()
        assert scope.cancelled_caught  # not rung: it waits
        await trio.to_thread.run_sync(bell.ring)  # from another thread, as the writer does
        await bell.wait()
        bell.ring()
        bell.ring()
        await bell.wait()  # two rings before a wait: one wake, and both are taken
        with trio.move_on_after(0.05) as scope:
            await bell.wait()
        assert scope.cancelled_caught
    finally:
        bell.close()


async def _queued_behind_a_held_writer(
    ob: Outbox, requests: list[SendRequest]
) -> tuple[list[AcceptOutcome], list[int]]:
    """Accept `requests` concurrently while the writer is held busy, so that
    all of them go to the writer in one batch; their outcomes, in order, and
    the order their writes were queued in (indices into `requests`)."""
    committer = ob.backend._committer  # type: ignore[attr-defined]
    release = threading.Event()
    outcomes: dict[int, AcceptOutcome] = {}
    index_of: dict[trio.lowlevel.Task, int] = {}

    async def accept(i: int) -> None:
        index_of[trio.lowlevel.current_task()] = i
        outcomes[i] = await ob.accept(requests[i])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(committer.submit, lambda conn: release.wait(10), durable=False))
        await wait_until(lambda: committer._busy)
        for i in range(len(requests)):
            nursery.start_soon(accept, i)
        await wait_until(lambda: len(committer._queue) == len(requests))
        queued = [index_of[op.task] for op in committer._queue]
        release.set()
    return [outcomes[i] for i in range(len(requests))], queued


async def test_concurrent_accepts_go_in_as_one_insert(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        committer = ob.backend._committer  # type: ignore[attr-defined]
        requests = [req(f"joint-{i}") for i in range(20)]
        outcomes, _ = await _queued_behind_a_held_writer(ob, requests)
        assert committer.joint_operations == 20  # one statement for the twenty
        assert all(o.inserted and o.kind is OutcomeKind.ACCEPTED_PENDING for o in outcomes)
        for i, outcome in enumerate(outcomes):
            row = await ob.get_by_client_id(f"joint-{i}")
            assert row is not None and row.id == outcome.row_id and row.payload == f"joint-{i}".encode()


async def test_a_taken_id_among_concurrent_accepts_gets_each_caller_its_own_answer(db_path: Path) -> None:
    # One id already taken makes the joint insert fall back to one insert
    # per caller: the retry is told about the row it made before, the reuse
    # of an id is refused, and every new id still goes in.
    async with open_outbox(db_path) as ob:
        committer = ob.backend._committer  # type: ignore[attr-defined]
        first = await ob.accept(req("taken", payload=b"original"))
        requests = [req(f"new-{i}") for i in range(5)]
        requests.insert(2, req("taken", payload=b"original"))  # a retry
        requests.insert(4, req("taken", payload=b"something else"))  # a reuse
        outcomes, _ = await _queued_behind_a_held_writer(ob, requests)
        assert committer.joint_operations == 0
        retry, reuse = outcomes.pop(2), outcomes.pop(3)
        assert (
            not retry.inserted and retry.kind is OutcomeKind.ACCEPTED_PENDING and retry.row_id == first.row_id
        )
        assert not reuse.inserted and reuse.kind is OutcomeKind.CONFLICT and reuse.row_id == first.row_id
        assert all(o.inserted for o in outcomes)
        assert (await ob.counts())["pending"] == 6


@settings(max_examples=30, deadline=None)
@given(
    taken=st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from([b"1", b"2"])),
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    batch=st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from([b"1", b"2"])), min_size=2, max_size=10
    ),
)
def test_accepts_sharing_a_commit_get_the_answers_of_accepts_made_one_at_a_time(
    taken: list[tuple[str, bytes]], batch: list[tuple[str, bytes]]
) -> None:
    # Whatever mix of new ids, retries and reused ids lands in one batch,
    # each id ends up with exactly one row, made by the first request for
    # it (in queue order) unless it was taken before; every other request
    # is told about that row: accepted when its payload matches, refused
    # when it does not.
    async def scenario(folder: str) -> None:
        async with open_outbox(Path(folder) / "o.db", durability="normal") as ob:
            kept = {
                cid: (payload, (await ob.accept(req(cid, payload=payload))).row_id) for cid, payload in taken
            }
            requests = [req(cid, payload=payload) for cid, payload in batch]
            outcomes, queued = await _queued_behind_a_held_writer(ob, requests)
            first: dict[str, int] = {}  # the request that makes each new id's row: the first queued
            for i in queued:
                first.setdefault(batch[i][0], i)
            for i, ((cid, payload), outcome) in enumerate(zip(batch, outcomes, strict=True)):
                makes_row = cid not in kept and first[cid] == i
                assert outcome.inserted == makes_row
                kept_payload = batch[first[cid]][1] if cid not in kept else kept[cid][0]
                row = await ob.get_by_client_id(cid)
                assert row is not None and row.payload == kept_payload and outcome.row_id == row.id
                if cid in kept:
                    assert row.id == kept[cid][1]
                if not makes_row:
                    assert outcome.kind is (
                        OutcomeKind.ACCEPTED_PENDING if payload == kept_payload else OutcomeKind.CONFLICT
                    )
            assert (await ob.counts())["pending"] == len({cid for cid, _ in taken + batch})

    with tempfile.TemporaryDirectory() as folder:
        trio.run(scenario, folder)


# -- a failure in a shared commit reaches only its own caller -------------------------------


async def _run_behind_a_held_writer(
    ob: Outbox,
    writes: list[Callable[[], Awaitable[Any]]],
    then: Callable[[sqlite3.Connection], object] = lambda conn: None,
) -> list[Any]:
    """Start `writes` together while the writer is held busy, so that they go
    to it as one batch; each one's result, or the exception it raised.
    `then` runs on the writer's connection as it is let go."""
    committer = ob.backend._committer  # type: ignore[attr-defined]
    release = threading.Event()
    results: dict[int, Any] = {}

    def hold(conn: sqlite3.Connection) -> None:
        release.wait(10)
        then(conn)

    async def write(i: int) -> None:
        try:
            results[i] = await writes[i]()
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(committer.submit, hold, durable=False))
        await wait_until(lambda: committer._busy)
        for i in range(len(writes)):
            nursery.start_soon(write, i)
        await wait_until(lambda: len(committer._queue) == len(writes))
        release.set()
    return [results[i] for i in range(len(writes))]


async def test_a_row_the_driver_cannot_store_fails_only_its_own_accept_in_a_shared_commit(
    db_path: Path,
) -> None:
    # Validation refuses such text; this is the store's own line of defence,
    # for rows that reach it some other way. The joint insert of the batch
    # fails on the bad rows, and every caller then gets its own answer.
    async with open_outbox(db_path) as ob:
        rows = [prepare_row(req(f"m-{i}"), now=1) for i in range(10)]
        rows[3] = rows[3]._replace(client_message_id="m-3\ud800")
        rows[7] = rows[7]._replace(target_spec="*\udfff")
        backend = ob.backend
        results = await _run_behind_a_held_writer(
            ob, [functools.partial(backend.accept_many, [row]) for row in rows]
        )
        bad = [results.pop(7), results.pop(3)]
        assert all(isinstance(e, UnicodeEncodeError) for e in bad), bad
        assert bad[0] is not bad[1]
        assert all(isinstance(r, list) and r[0].inserted for r in results), results
        assert (await ob.counts())["pending"] == 8


async def test_callers_of_a_batch_that_fails_as_a_whole_each_get_an_exception_of_their_own(
    db_path: Path,
) -> None:
    # BEGIN fails (another connection holds the write lock): every caller in
    # the batch fails, each raising its own exception object (one shared
    # instance would have its traceback rewritten by every task raising it).
    async with open_outbox(db_path) as ob:
        ob.backend._writer.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
        locker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)

        def lock_out_the_next_batch(conn: sqlite3.Connection) -> None:
            conn.execute("COMMIT")  # the holding batch lets the write lock go early,
            locker.execute("BEGIN IMMEDIATE")  # another connection takes it,
            conn.execute("BEGIN")  # and the holding batch commits an empty transaction

        try:
            results = await _run_behind_a_held_writer(
                ob,
                [functools.partial(ob.accept, req(f"m-{i}")) for i in range(5)],
                then=lock_out_the_next_batch,
            )
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert all(isinstance(r, StoreUnavailable) and "busy" in str(r) for r in results), results
        assert len({id(r) for r in results}) == 5
        assert all(isinstance(r.__cause__, sqlite3.OperationalError) for r in results)
        assert (await ob.accept(req("m-0"))).inserted  # nothing was consumed


async def test_an_operation_outside_a_transaction_cannot_leave_one_open_or_a_stale_durability(
    db_path: Path,
) -> None:
    from trio_drain import SendRequest, StoreError, open_outbox
    from trio_drain._store._sqlite._backend import SqliteBackend

    async with open_outbox(db_path) as ob:
        backend = ob.backend
        assert isinstance(backend, SqliteBackend)
        with pytest.raises(StoreError, match="left one open"):
            await backend.on_writer(lambda conn: conn.execute("BEGIN"))
        await backend.on_writer(lambda conn: conn.execute("PRAGMA synchronous = OFF"))
        # The writer still works, and a durable accept sets FULL again.
        assert (await ob.accept(SendRequest(mesh="a", target_spec="*", payload=b"x"))).inserted
        assert await backend.on_writer(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 2
