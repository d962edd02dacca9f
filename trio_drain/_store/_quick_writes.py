"""Quick writes: a write of a few rows, with the SQLite writer thread idle
and nothing queued, runs on the Trio thread (`GroupCommitter.submit` with
``quick=True``).

The hand-over to the writer thread and back is most of such a write's time
from call to answer (a lane's outcome with its next claim: 0.35 ms through
the writer thread, 0.20 here), and a lane moves one row per such write. It
must never stall the loop, so while writes run here the connection waits
for no lock (busy_timeout 0: another process's write lock sends the write
to the writer thread, which waits), is never asked for an fsync (quick
writes are not durable), checkpoints no WAL at commit (wal_autocheckpoint
0; every `HERE_STREAK`-th quick write in a row goes to the writer thread,
which sets the connection's own settings back and checkpoints as before),
and stops a write that turns out bigger than quick (`HERE_BUDGET`), which
is undone and goes to the writer thread too.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .._errors import StoreError
from ._sqlite._errors import is_busy, is_interrupted, translate

#: At most this many quick writes run on the Trio thread in a row; the next
#: goes to the writer thread, where the WAL may be checkpointed.
HERE_STREAK = 64
#: A quick write that takes more than this many SQLite instructions (a claim
#: walking rows that wait out a backoff, say: 25,000 and 0.7 ms for 4,000
#: such rows here) is undone and goes to the writer thread; a lane's outcome
#: with its next claim takes about 600, a claim of 4 about 1,000.
HERE_BUDGET = 20_000
HERE_STEP = 1_000


class Op(Protocol):
    """What a quick write needs of a group committer's operation."""

    fn: Callable[[sqlite3.Connection], Any]
    value: Any
    error: BaseException | None


class QuickWrites:
    """The quick path of one write connection, and the settings it set aside."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # The connection's own busy_timeout and wal_autocheckpoint while it
        # is set for writes here (both 0), else None.
        self._set_aside: tuple[int, int] | None = None
        self._streak = 0  # quick writes run here since the writer thread's last batch
        # After a quick write outgrew its budget, the next this many go to the
        # writer thread (doubling while they keep outgrowing it, up to
        # HERE_STREAK): a backlog that makes every small claim long wastes a
        # budget's time on the loop now and then, not at every claim.
        self._declined = 0
        self._backoff = 1

    def take_turn(self) -> bool:
        """Whether this quick write runs here, else it is the writer
        thread's turn (a turn declined counts down the backoff). Asked once
        per quick write the writer is idle for."""
        if self._streak >= HERE_STREAK:
            return False
        if self._declined:
            self._declined -= 1
            return False
        return True

    @trio.lowlevel.enable_ki_protection  # a Ctrl-C waits for the write's end, as on the writer thread
    def run(self, op: Op) -> bool:
        """Run `op` in a transaction of its own, here; its value or error
        are set. False, with nothing done, when another connection holds
        the write lock or the write outgrew its budget: it goes to the
        writer thread then. The caller has made sure the writer is idle."""
        conn = self._conn
        try:
            if self._set_aside is None:
                self._set_aside = (
                    conn.execute("PRAGMA busy_timeout").fetchone()[0],
                    conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                )
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            if is_busy(exc):
                return False
            op.error = translate(exc)
            return True
        # The budget as a C-level callable (0 until spent, then 1): no
        # Python runs inside SQLite's callback, so no signal handler can
        # run there and have its exception swallowed by the sqlite3 module.
        budget = itertools.chain(itertools.repeat(0, HERE_BUDGET // HERE_STEP), itertools.repeat(1))
        conn.set_progress_handler(functools.partial(next, budget), HERE_STEP)
        try:
            try:
                op.value = op.fn(conn)
            finally:
                conn.set_progress_handler(None, 0)
            if not conn.in_transaction:  # the operation swallowed an error that ended it
                raise StoreError("a write lost its transaction part-way (an error it swallowed ended it)")
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.rollback()
            op.value = None
            if isinstance(exc, sqlite3.Error) and is_interrupted(exc):
                # More work than a quick write: the writer thread has time for it.
                self._declined, self._backoff = self._backoff, min(2 * self._backoff, HERE_STREAK)
                return False
            op.error = translate(exc) if isinstance(exc, sqlite3.Error) else exc
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        self._streak += 1
        self._backoff = 1
        return True

    def writer_resumes(self) -> bool:
        """On the writer thread, before its batch: the connection's own
        settings back. True if synchronous must be set again."""
        self._streak = 0
        if self._set_aside is None:
            return False
        busy_timeout, autocheckpoint = self._set_aside
        self._set_aside = None
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout)}")
        self._conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
        return True
