"""Batched completions: many rows' outcomes recorded in one transaction.

The worker hands each row's `Completion` to the completer together with a
callback. The completer lets the batch grow while outcomes keep arriving
(one scheduling pass at a time), up to `max_batch` rows, every send still
in flight, or `max_delay` seconds, then writes it with one call (one
transaction, one thread hop), in the manner of River's batch completer,
and calls each callback with what became of its row. Nothing waits per
row: a batch of acks costs one task switch, not one per row.

The worker frees a row's send slot once its batch is written, which keeps
`max_inflight` honest: a slot is only free once its row has left
`inflight` in the database, so a crash resends at most `max_inflight` rows.
Its `write` claims rows for the freed slots in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from .._errors import StoreError, StoreUnavailable
from .._lifecycle import Completion
from .._outbox import Outbox
from .._store._base import Applied

log = logging.getLogger("trio_drain.worker")

#: Longest the final flush may take once the worker is stopping.
FLUSH_TIMEOUT = 10.0
#: First and longest wait between tries when the outbox is unavailable.
RETRY_DELAY = (0.05, 2.0)

#: Called once a completion's batch is written: True if it applied, False if
#: its lease had been taken over (it changed nothing), None if the batch
#: could not be written (the row stays inflight until its lease expires).
Recorded = Callable[[bool | None], None]


class BatchCompleter:
    """Collects completions and writes them in batches until closed.

    `run` ignores cancellation from outside: it stops only after `close()`,
    once everything queued is written (within `FLUSH_TIMEOUT`), so the
    hand-backs that a stopping worker queues on its way out are never
    dropped. The owner must call `close()` (the worker does, in a finally).
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        max_batch: int = 512,
        max_delay: float = 0.0005,
        in_flight: Callable[[], int],
        write: Callable[[Sequence[Completion]], Awaitable[Applied]] | None = None,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        # How a batch is written (the worker's also claims rows for the
        # slots it frees), and what to do once its callbacks have run.
        self.write = write if write is not None else outbox.complete
        self.after_batch = after_batch
        # Sends still outstanding: once that many completions are queued,
        # nobody else will add to the batch soon, so waiting is pure latency.
        self.in_flight = in_flight
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._completions: list[Completion] = []
        self._callbacks: list[Recorded] = []
        self._ready = trio.Event()  # the current batch has something in it
        self._full = trio.Event()  # the current batch reached max_batch
        self._closing = False
        self._scope: trio.CancelScope | None = None
        self.flushes = 0

    def submit(self, completion: Completion, recorded: Recorded) -> None:
        """Queue `completion` for the next batch; `recorded` is called once it is written."""
        self._completions.append(completion)
        self._callbacks.append(recorded)
        self._ready.set()
        if len(self._completions) >= min(self.max_batch, self.in_flight()):
            self._full.set()

    def close(self) -> None:
        """Write what is queued, then stop `run` (within FLUSH_TIMEOUT)."""
        self._closing = True
        self._ready.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + FLUSH_TIMEOUT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope(shield=True) as self._scope:
            task_status.started()
            while True:
                await self._ready.wait()
                if not self._closing:
                    await self._gather()
                await self._flush()
                if self._closing and not self._completions:
                    return
        if self._completions:
            log.error(
                "stopping with %d outcome(s) unwritten after %ss; those rows stay inflight until"
                " their lease expires",
                len(self._completions),
                FLUSH_TIMEOUT,
            )

    async def _gather(self) -> None:
        """Let the batch grow while outcomes keep coming: one scheduling pass
        at a time (every ack already received gets handled in a pass), until
        a pass brings nothing, every send in flight has reported, the batch
        is full, or `max_delay` has passed. A timer alone would wait out
        Trio's millisecond clock after the last ack of a burst."""
        deadline = trio.current_time() + self.max_delay
        while not self._full.is_set() and trio.current_time() < deadline:
            queued = len(self._completions)
            await trio.lowlevel.cancel_shielded_checkpoint()
            if len(self._completions) == queued:
                return

    async def _flush(self) -> None:
        completions, callbacks = self._completions, self._callbacks
        if not completions:
            return
        self._completions, self._callbacks = [], []
        self._ready = trio.Event()
        self._full = trio.Event()
        applied: list[bool] | None = None
        delay = RETRY_DELAY[0]
        try:
            while True:
                try:
                    applied = await self.write(completions)
                    return
                except StoreUnavailable as exc:
                    # A lost connection or a busy database: worth waiting
                    # for (until the worker stops), since the alternative
                    # is leaving the rows inflight for a whole lease.
                    log.warning(
                        "cannot record %d outcome(s) yet (%s); retrying in %.2fs",
                        len(completions),
                        exc,
                        delay,
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_DELAY[1])
                except StoreError as exc:
                    log.error(
                        "cannot record %d outcome(s) (%s); those rows stay inflight until"
                        " their lease expires",
                        len(completions),
                        exc,
                    )
                    return
        finally:
            if applied is None and self._scope is not None and self._scope.cancel_called:
                log.error(
                    "stopped before %d outcome(s) could be recorded; those rows stay"
                    " inflight until their lease expires",
                    len(completions),
                )
            self.flushes += 1
            if applied is None:
                for recorded in callbacks:
                    recorded(None)
            else:
                for recorded, ok in zip(callbacks, applied, strict=True):
                    recorded(ok)
            if self.after_batch is not None:
                self.after_batch()
