"""An idle SQLite worker notices other connections' commits (the store's
`watch`, `_store/_sqlite/_watch.py`): an application's `accept_in`, another
process's `accept`; and its own writes do not wake it."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
import trio

from trio_drain import DrainConfig, SendRequest, accept_in, open_outbox
from trio_drain._store._sqlite._backend import SqliteBackend

from .helpers import FakeBroker, Rig, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify: Linux only")

#: Polls every 30 s: what the test sees within seconds came from the watch.
IDLE = DrainConfig(poll_interval=30.0, lease=5.0, ack_timeout=2.0, maintenance_interval=30.0)


def request(cid: str) -> SendRequest:
    return SendRequest(mesh="alpha", target_spec="*", payload=b"hi", client_message_id=cid)


async def test_an_idle_worker_delivers_a_row_committed_by_the_applications_connection_at_once(
    db_path: Path,
) -> None:
    async with open_outbox(db_path) as outbox, trio.open_nursery() as nursery:
        broker = FakeBroker()
        await Rig(outbox, nursery, broker, config=IDLE).start()
        await trio.sleep(0.1)  # idle
        conn = sqlite3.connect(db_path)
        for n in range(3):
            accept_in(conn, request(f"m-{n}"))
            conn.commit()
            start = trio.current_time()
            await wait_until(lambda n=n: len(broker.received) == n + 1, seconds=5)  # type: ignore[misc]
            assert trio.current_time() - start < 1.0
        conn.close()
        nursery.cancel_scope.cancel()


async def test_a_foreign_commit_wakes_once_and_not_before_it_commits(db_path: Path) -> None:
    wakes: list[float] = []
    async with open_outbox(db_path) as outbox, trio.open_nursery() as nursery:
        backend = outbox.backend
        assert isinstance(backend, SqliteBackend)
        nursery.start_soon(backend.watch, lambda: wakes.append(trio.current_time()))
        await outbox.accept(request("own"))  # its own writes may wake it: not counted here
        await trio.sleep(0.2)
        wakes.clear()
        conn = sqlite3.connect(db_path)
        accept_in(conn, request("foreign"))
        await trio.sleep(0.2)
        assert wakes == []  # not before commit
        conn.commit()
        committed = trio.current_time()
        await wait_until(lambda: bool(wakes), seconds=5)
        assert wakes[0] - committed < 0.5
        await trio.sleep(0.2)
        assert len(wakes) == 1
        conn.close()
        nursery.cancel_scope.cancel()


async def test_a_rolled_back_transaction_wakes_nobody(db_path: Path) -> None:
    wakes: list[float] = []
    async with open_outbox(db_path) as outbox, trio.open_nursery() as nursery:
        backend = outbox.backend
        assert isinstance(backend, SqliteBackend)
        nursery.start_soon(backend.watch, lambda: wakes.append(trio.current_time()))
        await trio.sleep(0.1)
        conn = sqlite3.connect(db_path)
        for n in range(200):  # enough to spill frames into the WAL before the end
            accept_in(conn, SendRequest(payload=b"x" * 4000, client_message_id=f"big-{n}"))
        conn.rollback()
        await trio.sleep(0.5)
        assert wakes == []
        conn.close()
        nursery.cancel_scope.cancel()
