"""Group commit on one SQLite write connection, owned by a writer thread.

Every write is an operation queued for the writer thread. When it is idle,
the queue goes to it as one batch: every operation in one transaction (each
inside a savepoint, so one failing operation does not undo the others) and
one commit; what is queued meanwhile makes the next batch. Under
`synchronous=FULL` that turns N concurrent writes into one fsync instead of
N. Callers park on the Trio side; the batch's leader waits on a doorbell the
writer rings. The outbox's SQLite back end and the reference broker's
ledger both write through it.

A quick write (a lone outcome, a small claim: the caller says so) that
finds the writer idle and nobody waiting runs on the Trio thread instead
(`_quick_writes`): the hand-over to the writer thread and back
is most of such a write's time from call to answer, and a lane moves one
row per outcome written. It never waits there: a lock held by another
process, an fsync, a WAL checkpoint or more work than a quick write's
budget each send it, or the writes after it, to the writer thread.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import attrs
import outcome
import trio

from .._errors import StoreError
from ._doorbell import Doorbell
from ._quick_writes import QuickWrites
from ._sqlite._errors import own_error, translate

T = TypeVar("T")


@attrs.define(eq=False)
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    durable: bool
    task: trio.lowlevel.Task
    # Neighbouring operations of a batch with the same `joint` may run as one
    # statement: `joint(conn, fns)` returns each one's value, or None when
    # they must run one by one after all (see `_run_batch`).
    joint: Joint | None = None
    # Runs on the writer's connection outside any transaction (a PRAGMA that
    # must not meet a batch half-way), before the batch it came with.
    bare: bool = False
    taken: bool = False
    value: Any = None
    error: BaseException | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[no-any-return]


Joint = Callable[[sqlite3.Connection, list[Any]], "list[Any] | None"]

# What a parked caller is woken with when its batch has gone to the writer
# and it is the one to wait for the writer's doorbell.
_LEAD = object()


@attrs.frozen(kw_only=True)
class CommitStatistics:
    """What a group committer has done so far (a snapshot).

    Attributes:
        transactions: batches committed.
        operations: write operations in them.
        joint_operations: operations that ran as part of a joint statement.
    """

    transactions: int
    operations: int
    joint_operations: int


class GroupCommitter:
    """Runs queued write operations together, one transaction per batch, on
    a writer thread of its own.

    The handoff is as light as Trio allows. A caller queues its operation;
    if the writer is idle the queue goes to it at once as a batch, through
    a `queue.SimpleQueue`, and that caller leads the batch: it waits on the
    doorbell the writer rings when done, then wakes the batch's other
    callers and sends the next batch, made of everything queued meanwhile
    (whose first caller leads it). Callers that are not leading park
    (`wait_task_rescheduled`). That is group commit with no lock, no limiter
    and no thread pool between a caller and the database. An operation not
    yet taken by a batch can be cancelled; one taken is never abandoned.
    """

    def __init__(self, conn: sqlite3.Connection, *, durable: bool) -> None:
        self._conn = conn
        self._durable = durable  # whether the connection may fsync at all
        self._synchronous: str | None = "FULL" if durable else "NORMAL"
        self._queue: list[_Op[Any]] = []  # waiting for the next batch
        self._running: list[_Op[Any]] | None = None  # the batch on the writer thread
        self._closed = False
        self._gathering = False  # a caller is about to start a batch
        self._last_batch = 0  # operations in the batch last sent
        self._idle = trio.Event()  # set whenever nothing is queued or running
        self._idle.set()
        self._jobs: queue.SimpleQueue[list[_Op[Any]] | None] = queue.SimpleQueue()
        self._done: list[_Op[Any]] | None = None  # the batch the writer finished last
        self._bell = Doorbell()
        self._thread: threading.Thread | None = None
        self._here = QuickWrites(conn)
        self.batches = 0
        self.operations = 0
        self.joint_operations = 0  # operations that ran as part of a joint statement

    def statistics(self) -> CommitStatistics:
        """A snapshot of the counters."""
        return CommitStatistics(
            transactions=self.batches, operations=self.operations, joint_operations=self.joint_operations
        )

    async def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool,
        joint: Joint | None = None,
        bare: bool = False,
        quick: bool = False,
    ) -> T:
        """Run `fn(conn)` in a transaction of the next batch and return its
        value (or raise its error). `durable`: the commit must survive power
        loss (an fsync). `quick`: a write of a few rows, which may run on the
        calling thread when the writer is idle (`_quick_writes`)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        op: _Op[T] = _Op(fn, durable and self._durable, trio.lowlevel.current_task(), joint, bare)
        if quick and not op.durable and self._quick_turn() and self._here.run(op):
            op.taken = True
            self._last_batch = 1
            self.batches += 1
            self.operations += 1
            # A schedule point, as every write through the writer thread has
            # (its caller parks): a loop of quick writes starves no task.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return op.result()
        self._queue.append(op)
        if self._idle.is_set():
            self._idle = trio.Event()
        if not self._busy and not self._gathering and not self._closed:
            if self._last_batch > 1:
                # Writers are concurrent: yield once before starting a batch,
                # so that tasks woken together (the callers of the batch just
                # committed) all join it, rather than the first making a
                # batch of one. A lone caller skips the wait.
                self._gathering = True
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._gathering = False
            if not self._busy and not self._closed:  # our operation is still queued: nobody sent a batch
                await self._lead(self._dispatch())
                return op.result()

        def abort(_: Any) -> trio.lowlevel.Abort:
            if op.taken:  # a write in progress is never abandoned
                return trio.lowlevel.Abort.FAILED
            self._queue.remove(op)  # withdrawn: nothing is written behind our back
            if not self._queue and not self._busy:
                self._idle.set()
            return trio.lowlevel.Abort.SUCCEEDED

        if await trio.lowlevel.wait_task_rescheduled(abort) is _LEAD:
            assert self._running is not None
            await self._lead(self._running)
        return op.result()

    def _quick_turn(self) -> bool:
        """Whether this quick write runs on the Trio thread: nothing queued
        or running, and the quick path takes it (which counts the turn)."""
        return (
            not self._queue
            and not self._busy
            and not self._closed
            and not self._gathering
            and self._here.take_turn()  # last: it counts the turns it declines
        )

    @property
    def _busy(self) -> bool:
        """A batch is on the writer thread."""
        return self._running is not None

    async def aclose(self) -> None:
        """Wait out queued and running batches, then close the connection
        (on the writer thread) and let the thread end."""
        await self._idle.wait()
        self._closed = True  # nothing else may start
        if self._thread is not None:
            self._jobs.put(None)
            await trio.to_thread.run_sync(self._thread.join)
        else:
            self._conn.close()
        self._bell.close()

    def _dispatch(self) -> list[_Op[Any]]:
        batch, self._queue = self._queue, []
        self._last_batch = len(batch)
        for op in batch:
            op.taken = True
        self._running = batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="trio-drain sqlite writer", daemon=True)
            self._thread.start()
        self._jobs.put(batch)
        return batch

    async def _lead(self, batch: list[_Op[Any]]) -> None:
        """Wait for the writer to finish `batch` (shielded: it is never
        abandoned), then wake its other callers and send the next batch."""
        with trio.CancelScope(shield=True):
            while self._done is not batch:
                await self._bell.wait()
        self._running = None
        me = trio.lowlevel.current_task()
        for op in batch:
            if op.task is not me:
                trio.lowlevel.reschedule(op.task)
        if self._queue:
            trio.lowlevel.reschedule(self._dispatch()[0].task, outcome.Value(_LEAD))
        else:
            self._idle.set()

    def _serve(self) -> None:
        """The writer thread: run each batch, ring the doorbell."""
        while True:
            batch = self._jobs.get()
            if batch is None:
                self._conn.close()
                return
            try:
                if self._here.writer_resumes():
                    self._synchronous = None  # set again before the next batch
                self._run_bare([op for op in batch if op.bare])
                self._run_batch([op for op in batch if not op.bare])
            except BaseException as exc:  # never leave a caller parked forever
                for op in batch:
                    op.value, op.error = None, own_error(exc)
            self._done = batch
            self._bell.ring()

    def _run_bare(self, ops: list[_Op[Any]]) -> None:
        """Operations that run outside any transaction, each alone."""
        conn = self._conn
        for op in ops:
            try:
                op.value = op.fn(conn)
            except Exception as exc:
                op.error = translate(exc) if isinstance(exc, sqlite3.Error) else exc
            if conn.in_transaction:  # it began one: the writer's batches need it closed
                conn.rollback()
                op.value, op.error = None, StoreError("an operation outside a transaction left one open")
        if ops:
            self._synchronous = None  # it may have changed it: set it again before the next batch

    def _run_batch(self, batch: list[_Op[Any]]) -> None:
        """Run `batch` in one transaction. An operation that fails gets its
        own exception and leaves the others be; a failure of the whole batch
        (BEGIN or COMMIT failed) gives each operation an exception of its own."""
        if not batch:
            return
        conn = self._conn
        try:
            synchronous = "FULL" if any(op.durable for op in batch) else "NORMAL"
            if synchronous != self._synchronous:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                self._synchronous = synchronous
            conn.execute("BEGIN IMMEDIATE")
            self._in_transaction(batch)
        except sqlite3.Error as exc:
            for op in batch:
                op.value, op.error = None, translate(exc)
        finally:
            self.batches += 1
            self.operations += len(batch)

    def _in_transaction(self, batch: list[_Op[Any]]) -> None:
        """Run `batch` in the transaction just begun, and commit (or roll
        back and raise, if the commit or the batch as a whole failed)."""
        conn = self._conn
        try:
            if len(batch) == 1:  # no neighbour to protect: skip the savepoint
                op = batch[0]
                try:
                    op.value = op.fn(conn)
                except Exception as exc:
                    conn.rollback()
                    op.error = translate(exc) if isinstance(exc, sqlite3.Error) else exc
                    return
            else:
                for run in _runs(batch):
                    if len(run) > 1 and self._run_joint(run):
                        continue
                    for op in run:
                        conn.execute("SAVEPOINT op")
                        try:
                            op.value = op.fn(conn)
                        except Exception as exc:
                            conn.execute("ROLLBACK TO op")
                            op.error = translate(exc) if isinstance(exc, sqlite3.Error) else exc
                        conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _run_joint(self, run: list[_Op[Any]]) -> bool:
        """Run neighbouring operations of one kind as one; False (with
        nothing changed) if they must run one by one after all: an id
        already taken, or any error (say one row's text the driver cannot
        bind), which then meets only the operation it belongs to."""
        conn = self._conn
        joint = run[0].joint
        assert joint is not None
        conn.execute("SAVEPOINT joint")
        try:
            values = joint(conn, [op.fn for op in run])
        except Exception:  # each operation will meet its own error alone
            values = None
        if values is None:
            conn.execute("ROLLBACK TO joint")
        conn.execute("RELEASE joint")
        if values is None:
            return False
        for op, value in zip(run, values, strict=True):
            op.value = value
        self.joint_operations += len(run)
        return True


def _runs(batch: list[_Op[Any]]) -> Iterator[list[_Op[Any]]]:
    """The batch in order, as runs of neighbours sharing a `joint` (and
    operations without one alone)."""
    run = [batch[0]]
    for op in batch[1:]:
        if op.joint is not None and op.joint is run[-1].joint:
            run.append(op)
        else:
            yield run
            run = [op]
    yield run
