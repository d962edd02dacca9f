"""Quick writes on SQLite: a lone outcome or a small claim that finds the
writer idle runs on the Trio thread, never waiting there for a lock, an
fsync or a checkpoint (`_group_commit.GroupCommitter._run_here`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from trio_drain import Outbox, StoreError, open_outbox
from trio_drain import _lifecycle as lc
from trio_drain._store._group_commit import GroupCommitter
from trio_drain._store._quick_writes import HERE_STREAK

from .builders import BIG, req


@pytest.fixture
async def committer(db_path: Path) -> AsyncIterator[GroupCommitter]:
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("CREATE TABLE t (x)")
    c = GroupCommitter(conn, durable=True)
    yield c
    await c.aclose()


def insert_on(threads: list[str]):  # type: ignore[no-untyped-def]
    def op(conn: sqlite3.Connection) -> int:
        threads.append(threading.current_thread().name)
        return conn.execute("INSERT INTO t VALUES (1)").rowcount

    return op


async def test_a_quick_write_runs_here_and_the_others_on_the_writer_thread(committer: GroupCommitter) -> None:
    threads: list[str] = []
    assert await committer.submit(insert_on(threads), durable=False, quick=True) == 1
    assert await committer.submit(insert_on(threads), durable=False) == 1
    # A write that must be durable fsyncs: never on the loop.
    assert await committer.submit(insert_on(threads), durable=True, quick=True) == 1
    here = threading.current_thread().name
    assert threads == [here, "trio-drain sqlite writer", "trio-drain sqlite writer"]


async def test_the_connections_own_settings_come_back_on_the_writer_thread(committer: GroupCommitter) -> None:
    threads: list[str] = []
    await committer.submit(insert_on(threads), durable=False, quick=True)

    def settings(conn: sqlite3.Connection) -> tuple[int, int]:
        return (
            conn.execute("PRAGMA busy_timeout").fetchone()[0],
            conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
        )

    # While writes run here it waits for no lock and checkpoints nothing...
    assert await committer.submit(settings, durable=False, quick=True) == (0, 0)
    # ...and the writer thread has its own back.
    assert await committer.submit(settings, durable=False) == (5000, 1000)


async def test_every_so_many_quick_writes_in_a_row_one_goes_to_the_writer(committer: GroupCommitter) -> None:
    threads: list[str] = []
    for _ in range(2 * HERE_STREAK + 2):
        await committer.submit(insert_on(threads), durable=False, quick=True)
    here = threading.current_thread().name
    assert [i for i, name in enumerate(threads) if name != here] == [HERE_STREAK, 2 * HERE_STREAK + 1]


async def test_the_wal_is_checkpointed_though_most_writes_run_here(db_path: Path) -> None:
    # Every write here leaves the WAL as it is; the writer thread's share
    # checkpoints it, so it stays near SQLite's 1,000 pages (4 MB), where a
    # WAL that is never checkpointed would grow by pages a write.
    async with open_outbox(db_path, durability="normal") as ob:
        await ob.accept_many([req(f"m-{i}") for i in range(3000)])
        wal_before = Path(f"{db_path}-wal").stat().st_size
        for i in range(3000):
            (row,) = await ob.claim(limit=1, lease_ms=60_000, max_age_ms=BIG, token=f"t{i}")
            await ob.complete([lc.on_ack(row, broker_message_id="b", now=0)])
        wal = Path(f"{db_path}-wal").stat().st_size
        assert wal < max(wal_before, 6 * 1024 * 1024), (wal_before, wal)
        assert (await ob.counts())["done"] == 3000


async def test_a_quick_write_finding_another_process_writing_waits_on_the_writer_thread(
    db_path: Path,
) -> None:
    async with open_outbox(db_path, durability="normal") as ob:
        await ob.accept(req("m-0"))
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        ticks = 0
        claimed: list[object] = []

        async def ticker() -> None:
            nonlocal ticks
            while not claimed:
                ticks += 1
                await trio.sleep(0.01)

        async def claim() -> None:
            claimed.extend(await ob.claim(limit=1, lease_ms=60_000, max_age_ms=BIG, token="t"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                nursery.start_soon(claim)
                await trio.sleep(0.3)
                assert not claimed and ticks >= 3  # it waits, and the loop runs on
                other.rollback()
        assert len(claimed) == 1
        other.close()


async def test_a_quick_write_that_fails_is_undone_and_raises_its_own_error(committer: GroupCommitter) -> None:
    def fails(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(Exception, match="no such table"):
        await committer.submit(fails, durable=False, quick=True)

    def count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])

    assert await committer.submit(count, durable=False, quick=True) == 0
    assert committer._thread is None  # both ran here


async def test_a_quick_write_bigger_than_its_budget_goes_to_the_writer_thread(
    committer: GroupCommitter,
) -> None:
    threads: list[str] = []

    def big(conn: sqlite3.Connection) -> int:
        threads.append(threading.current_thread().name)
        conn.execute("INSERT INTO t VALUES (1)")  # undone on the Trio thread, then done once
        return int(
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)"
                " SELECT count(*) FROM n"
            ).fetchone()[0]
        )

    assert await committer.submit(big, durable=False, quick=True) == 100_000
    here = threading.current_thread().name
    assert threads == [here, "trio-drain sqlite writer"]  # begun here, undone, done there

    def count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])

    assert await committer.submit(count, durable=False) == 1


async def test_while_quick_writes_outgrow_their_budget_ever_more_of_them_go_straight_to_the_writer(
    committer: GroupCommitter,
) -> None:
    tried_here: list[int] = []
    here = threading.current_thread().name

    def big(k: int) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            if threading.current_thread().name == here:
                tried_here.append(k)
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)"
                " SELECT count(*) FROM n"
            ).fetchone()

        return op

    for k in range(12):
        await committer.submit(big(k), durable=False, quick=True)
    assert tried_here == [0, 2, 5, 10]  # 1, 2, then 4 declined in between
    # One that fits its budget ends the backoff: the next big one is tried here again.
    threads: list[str] = []
    for _ in range(9):  # the 8 still declined, then one here
        await committer.submit(insert_on(threads), durable=False, quick=True)
    assert threads[-1] == here
    await committer.submit(big(99), durable=False, quick=True)
    assert tried_here[-1] == 99


async def test_a_quick_write_that_swallows_the_end_of_its_transaction_fails_and_is_not_run_again(
    committer: GroupCommitter,
) -> None:
    def swallows(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.rollback()  # as a swallowed error that ended the transaction would
        conn.execute("INSERT INTO t VALUES (2)")  # in autocommit: kept, whatever happens next

    with pytest.raises(StoreError, match="lost its transaction"):
        await committer.submit(swallows, durable=False, quick=True)

    def values(conn: sqlite3.Connection) -> list[int]:
        return [v for (v,) in conn.execute("SELECT x FROM t")]

    assert await committer.submit(values, durable=False) == [2]  # not run again on the writer thread


async def test_quick_writes_are_schedule_points(committer: GroupCommitter) -> None:
    threads: list[str] = []
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        for _ in range(20):
            await committer.submit(insert_on(threads), durable=False, quick=True)
        nursery.cancel_scope.cancel()
    assert others >= 10


async def test_a_lane_moves_through_quick_writes_as_before(db_path: Path) -> None:
    """The worker's shape: a head's outcome with its lane's next claim, one
    write each, all here; the lane still goes in order."""
    async with open_outbox(db_path, durability="normal") as ob:
        outbox: Outbox = ob
        for i in range(5):
            await outbox.accept(req(f"k-{i}", ordering_key="k"))
        (row,) = await outbox.claim(limit=1, lease_ms=60_000, max_age_ms=BIG, token="t")
        seen = [row.client_message_id]
        while True:
            _, rows = await outbox.complete_and_claim(
                [lc.on_ack(row, broker_message_id="b", now=0)],
                limit=1,
                lease_ms=60_000,
                max_age_ms=BIG,
                token="t",
            )
            if not rows:
                break
            (row,) = rows
            seen.append(row.client_message_id)
        assert seen == [f"k-{i}" for i in range(5)]
