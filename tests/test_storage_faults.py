"""Storage faults on the SQLite outbox: another process holding the write
lock, a full disk, a file gone read-only, a file corrupted while closed.

Each must give a clear `StoreUnavailable` / `CorruptDatabase`, lose nothing,
never crash the worker into a restart loop, and recover when it clears.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_drain import (
    CorruptDatabase,
    DrainConfig,
    Outbox,
    StoreError,
    StoreUnavailable,
    open_outbox,
)
from trio_drain._brokers._identity import generate_secret_key
from trio_drain._store._sqlite._backend import SqliteBackend
from trio_drain._store._sqlite._errors import translate as _translate

from .builders import req
from .helpers import Rig
from .procs import assert_clean_error, run

FAST = DrainConfig(
    poll_interval=0.05, lease=5.0, ack_timeout=1.0, maintenance_interval=0.2, max_inflight=8, batch_size=8
)


@pytest.fixture
async def ob(db_path: Path) -> AsyncIterator[Outbox]:
    async with open_outbox(db_path) as outbox:
        yield outbox


async def on_writer(ob: Outbox, sql: str) -> Any:
    """Inject a fault into the store's own write connection: `sql` runs on
    the writer thread between batches (never from the Trio thread, where it
    would race a write in progress). Returns the first column of the first row."""
    backend = ob.backend
    assert isinstance(backend, SqliteBackend)

    def run(conn: sqlite3.Connection) -> Any:
        found = conn.execute(sql).fetchone()
        return None if found is None else found[0]

    return await backend.on_writer(run)


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def hold_write_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


async def test_a_brief_lock_by_another_process_is_waited_out(ob: Outbox, db_path: Path) -> None:
    await ob.accept(req("before"))
    locker = hold_write_lock(db_path, 0.5)
    try:
        outcome = await ob.accept(req("during"))  # waits for the lock, within busy_timeout
    finally:
        await trio.to_thread.run_sync(locker.communicate)
    assert outcome.inserted
    assert (await ob.counts())["pending"] == 2


async def test_a_long_lock_is_a_clear_busy_error_and_the_worker_rides_it_out(
    ob: Outbox, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await ob.accept_many([req(f"m-{i}") for i in range(20)])
    # Half a second of patience instead of five, to keep the test short.
    await on_writer(ob, "PRAGMA busy_timeout = 500")
    locker = hold_write_lock(db_path, 3.0)
    try:
        async with trio.open_nursery() as nursery:
            rig = Rig(ob, nursery, config=FAST)
            nursery.start_soon(rig.worker().run)
            with pytest.raises(StoreUnavailable, match="busy"):
                await ob.accept(req("refused"))
            assert await ob.get_by_client_id("refused") is None  # nothing half-written
            await trio.to_thread.run_sync(locker.communicate)
            await rig.settled(20, among=("done",), seconds=15)
            assert (await ob.accept(req("refused"))).inserted  # the failure consumed no id
            nursery.cancel_scope.cancel()
    finally:
        if locker.returncode is None:
            locker.kill()
            locker.communicate()
    assert "outbox unavailable" in caplog.text


async def test_a_full_disk_refuses_accepts_cleanly_and_recovers(
    ob: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    await ob.accept_many([req(f"m-{i}") for i in range(50)])
    pages = await on_writer(ob, "PRAGMA page_count")
    await on_writer(ob, f"PRAGMA max_page_count = {pages}")  # the disk is full now
    with pytest.raises(StoreUnavailable, match="cannot grow"):
        await ob.accept_many([req(f"big-{i}", meta={"pad": "x" * 2000}) for i in range(20)])
    assert (await ob.counts())["pending"] == 50
    assert await ob.get_by_client_id("big-0") is None

    # The worker keeps delivering what is there: updates need no new pages.
    async with trio.open_nursery() as nursery:
        rig = Rig(ob, nursery, config=FAST)
        await rig.start()
        await rig.settled(50, among=("done",))
        await on_writer(ob, "PRAGMA max_page_count = 1073741823")  # space freed
        outcomes = await ob.accept_many([req(f"big-{i}", meta={"pad": "x" * 2000}) for i in range(20)])
        assert all(o.inserted for o in outcomes)
        await rig.settled(70, among=("done",))
        nursery.cancel_scope.cancel()
    assert await on_writer(ob, "PRAGMA quick_check") == "ok"


async def test_a_file_gone_read_only_refuses_writes_and_recovers(ob: Outbox) -> None:
    # Root ignores file modes, so the read-only state is set on the
    # connection, as when the file system is remounted read-only.
    await ob.accept(req("m-1"))
    await on_writer(ob, "PRAGMA query_only = ON")
    with pytest.raises(StoreUnavailable, match="read-only"):
        await ob.accept(req("m-2"))
    with pytest.raises(StoreUnavailable, match="read-only"):
        await ob.claim(limit=1, lease_ms=1000, max_age_ms=10**9, token="t")
    assert await ob.counts() == {"pending": 1, "inflight": 0, "done": 0, "dead": 0, "aborted": 0}
    await on_writer(ob, "PRAGMA query_only = OFF")
    assert (await ob.accept(req("m-2"))).inserted


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to files whatever their mode")
async def test_a_read_only_file_is_a_clear_error_at_open(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept(req("m-1"))
    db_path.chmod(0o400)
    with pytest.raises(StoreUnavailable, match="read-only"):
        async with open_outbox(db_path) as ob:
            await ob.accept(req("m-2"))


def test_run_on_a_file_corrupted_while_closed_exits_1_at_once_and_leaves_it(tmp_path: Path) -> None:
    db = tmp_path / "o.db"

    async def fill() -> None:
        async with open_outbox(db) as ob:
            await ob.accept_many([req(f"m-{i}", payload=os.urandom(500)) for i in range(400)])

    trio.run(fill)
    data = bytearray(db.read_bytes())
    data[10 * 4096 : 10 * 4096 + 200] = b"\xff" * 200  # scribble over a page while nobody has it open
    db.write_bytes(bytes(data))
    config = tmp_path / "c.toml"
    config.write_text(
        '[[mesh]]\nslug = "alpha"\nmesh_id = "m"\nmember_id = "u"\n'
        f'broker_url = "ws://127.0.0.1:1/ws"\nsecret_key = "{generate_secret_key()}"\n'
    )
    result = run("run", "--db", str(db), "--config", str(config), timeout=30)
    # Which of SQLite's two verdicts comes depends on what the scribbled page held.
    try:
        assert_clean_error(result, 1, "not a usable SQLite database")
    except AssertionError:
        assert_clean_error(result, 1, "failed its integrity check")
    assert db.read_bytes() == bytes(data)


async def test_the_worker_backs_off_instead_of_spinning_while_the_store_fails(
    ob: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    await ob.accept(req("m-1"))
    await on_writer(ob, "PRAGMA query_only = ON")
    async with trio.open_nursery() as nursery:
        rig = Rig(ob, nursery, config=FAST)
        await rig.start()
        await trio.sleep(2.0)
        failures = caplog.text.count("outbox unavailable")
        # poll_interval 0.05 doubling to a 5 s cap: a handful of tries, not hundreds.
        assert 2 <= failures <= 10, failures
        await on_writer(ob, "PRAGMA query_only = OFF")
        await rig.settled(1, among=("done",))
        nursery.cancel_scope.cancel()


# -- telling errors apart --------------------------------------------------------------


def test_sqlite_errors_are_told_apart_by_their_result_code_not_their_message(tmp_path: Path) -> None:
    # A message may quote a table, a column or a value: words such as
    # "locked", "busy", "full" or "corrupt" in it say nothing of the error.
    conn = sqlite3.connect(tmp_path / "names.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as missing:
            conn.execute("SELECT * FROM locked_busy_full_readonly_corrupt")
        conn.execute("CREATE TABLE t (disk_full INTEGER CONSTRAINT is_locked CHECK (disk_full > 0))")
        with pytest.raises(sqlite3.IntegrityError) as check:
            conn.execute("INSERT INTO t VALUES (0)")
    finally:
        conn.close()
    for exc in (missing.value, check.value):
        translated = _translate(exc)
        assert type(translated) is StoreError, (exc, translated)
        assert translated.__cause__ is exc

    # A real SQLITE_BUSY, whatever its text.
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    other = sqlite3.connect(tmp_path / "busy.db", isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("BEGIN IMMEDIATE")
    finally:
        holder.close()
        other.close()
    assert busy.value.sqlite_errorname == "SQLITE_BUSY"
    assert isinstance(_translate(busy.value), StoreUnavailable)

    # Extended codes count as their primary code; the message plays no part.
    def coded(name: str, text: str = "something went wrong") -> sqlite3.Error:
        exc = sqlite3.OperationalError(text)
        exc.sqlite_errorname = name
        return exc

    assert type(_translate(coded("SQLITE_CORRUPT_INDEX"))) is CorruptDatabase
    assert type(_translate(coded("SQLITE_NOTADB"))) is CorruptDatabase
    assert "busy" in str(_translate(coded("SQLITE_BUSY_SNAPSHOT")))
    assert "busy" in str(_translate(coded("SQLITE_LOCKED_SHAREDCACHE")))
    assert "cannot grow" in str(_translate(coded("SQLITE_FULL")))
    assert "read-only" in str(_translate(coded("SQLITE_READONLY_DBMOVED")))
    assert type(_translate(coded("SQLITE_IOERR_SHORT_READ", "database is locked"))) is StoreError
    # An error of the sqlite3 module's own has no result code: a plain StoreError.
    assert type(_translate(sqlite3.ProgrammingError("Cannot operate on a closed database."))) is StoreError
