"""Noticing other connections' commits to an SQLite outbox, for an idle worker.

Another process's `accept`, or an application's `accept_in` on a connection
of its own, commits to the file behind the worker's back; SQLite has no
notifications. What was measured (2 cores, Python 3.11, SQLite 3.40):

- ``PRAGMA data_version`` (which changes when another connection commits)
  costs 2 µs in a loop, but about 25 µs when polled from a sleeping thread
  (each read takes WAL read locks: system calls), and the wakeups
  themselves about 25 µs more. Polled every 1, 2 or 5 ms from a thread it
  notices a commit of another process within 1.3, 1.8 and 3.0 ms (p50) at
  6.1%, 3.5% and 2.0% of a core while idle: a poll storm, next to a
  worker that uses 1.5% of a core during a broker outage (budget 5%).
- The WAL's change counter, read from the shared-memory file, costs
  0.13 µs and no system call, but the sleeping thread still costs 1.5% at
  2 ms; and it is SQLite's private format.

So nothing is polled. On Linux an inotify watch on the ``-wal`` file (every
commit writes it) wakes a task that costs nothing while no one writes;
``PRAGMA data_version``, read in a thread, then tells a commit from frames
still being written (a commit is visible only once its frames are synced
and the WAL index updated, so it is read again every millisecond or so). The
worker's own writes (its claims and outcomes, this process's `accept`)
change the file too: while the store's writer is at work the worker is
awake anyway, so the watch lets those events pile up (inotify coalesces
unread events) and looks once the writer rests, and never sooner than
`LOOK_GAP` after its last look: a store that commits often (a lane moving
a row per round trip commits every 2 ms or so) costs at most one look at
the outbox for nothing every `LOOK_GAP`, not one a commit (measured: a
lane at a 1 ms ack delay moved 0.64 of a row per round trip with a look a
commit, each a claim and a read for nothing on the loop's and the
writer's time, and 0.67 to 0.70 with no watch at all). Elsewhere (no inotify), or if the watch cannot be
set, it sleeps, and the poll interval finds such rows, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import trio

log = logging.getLogger("trio_drain.sqlite")

_IN_MODIFY = 0x2
#: While the store's own writer is at work, how often the watch looks again.
OWN_WRITES_QUIET = 0.02
#: The least time between two looks: a commit in between waits this long
#: at most (an idle store's first commit is looked at at once).
LOOK_GAP = 0.02
#: When to look again for the commit a write belongs to: it is visible once
#: its frames are synced (a few ms) and the WAL index updated; a write that
#: does not turn into a commit (a large transaction, rolled back) is given
#: up on after about 0.2 s, for the poll.
_CONFIRM_DELAYS = (0.0, *[0.001] * 8, *[0.002] * 4, *[0.005] * 4, 0.01, 0.02, 0.05, 0.1)


async def watch_commits(path: Path, wake: Callable[[], None], *, writing: Callable[[], bool]) -> NoReturn:
    """Call `wake` after a commit to the database at `path` by a connection
    other than this store's; runs until cancelled.

    `writing()` says whether the store's own writer is running a
    transaction. A commit of its own may wake too (one look at the outbox
    for nothing).
    """
    fd = _inotify(Path(f"{path}-wal"))
    if fd is None:
        await trio.sleep_forever()
    conn: sqlite3.Connection | None = None
    try:
        conn = await trio.to_thread.run_sync(_connect, path)
        last = await trio.to_thread.run_sync(_data_version, conn)
        looked_at = -LOOK_GAP
        while True:
            await trio.lowlevel.wait_readable(fd)
            await trio.sleep_until(looked_at + LOOK_GAP)
            # The store's writer at work means the worker is awake: its
            # events pile up (coalesced) until it rests. A sleep, not the
            # writer's idle event: a busy writer rests between every two
            # batches, and this should look far less often than that.
            while writing():  # noqa: ASYNC110
                await trio.sleep(OWN_WRITES_QUIET)
            _drain(fd)
            looked_at = trio.current_time()
            for delay in _CONFIRM_DELAYS:
                await trio.sleep(delay)
                version = await trio.to_thread.run_sync(_data_version, conn)
                if version != last:
                    last = version
                    wake()
                    break
    finally:
        os.close(fd)
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _data_version(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.execute("PRAGMA data_version").fetchone()[0])
    except sqlite3.Error as exc:  # a transient lock: the poll is the backstop
        log.debug("cannot read data_version: %s", exc)
        return -1


def _drain(fd: int) -> None:
    """Read every event queued (what they say does not matter)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _inotify(wal: Path) -> int | None:
    """A non-blocking inotify descriptor watching `wal` for writes, or None
    where there is no inotify or the watch cannot be set."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError) as exc:
        log.debug("no inotify (%s): other processes' commits wait for the poll", exc)
        return None
    if fd < 0:
        log.debug("inotify_init1 failed (errno %d)", ctypes.get_errno())
        return None
    if libc.inotify_add_watch(fd, os.fsencode(wal), _IN_MODIFY) < 0:
        log.debug(
            "cannot watch %s (errno %d): other processes' commits wait for the poll", wal, ctypes.get_errno()
        )
        os.close(fd)
        return None
    return fd
