"""Wakeups across processes: one connection held in LISTEN, waited on from Trio.

An accept that inserts a row issues `NOTIFY trio_drain_outbox` in its
transaction (so a worker hears of it at the commit, not before). The
listener waits on its connection's socket from Trio directly (no thread),
and reconnects with backoff. Notifications can be lost (a reconnect, a
pooler in transaction mode), so the worker keeps its poll interval as the
backstop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, NoReturn

import psycopg
import trio

from ..._errors import StoreUnavailable
from ._pool import Pool, first_line, translate
from ._statements import CHANNEL

log = logging.getLogger("trio_drain.postgres")


class Listener:
    """The LISTEN connection of one back end."""

    def __init__(self, pool: Pool, where: str) -> None:
        self._pool = pool
        self.where = where
        #: Backoff of the reconnects, (first, most) in seconds.
        self.reconnect = (0.1, 5.0)
        #: Whether the connection is up and listening.
        self.listening = False

    async def run(self, wake: Callable[[], None]) -> NoReturn:
        """LISTEN for accepts in other processes and call `wake` for each burst.

        Runs until cancelled. Waits on the connection's socket from Trio, so
        no thread is tied up; a lost connection is reopened with backoff, and
        `wake` is called after every (re)connect since notifications sent
        while disconnected are gone.
        """
        low, high = self.reconnect
        delay = low
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = await trio.to_thread.run_sync(self._connect)
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
                    first_line(exc),
                    delay,
                )
            finally:
                self.listening = False
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.close)
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, high)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self._pool.connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            conn.close()
            raise translate(exc, self.where) from None
        return conn
