"""Concurrent accepts share a statement, and so a commit.

On PostgreSQL every accept is a round trip and a WAL flush; the server
overlaps the flushes of concurrent commits, but each accept still costs a
statement's worth of CPU on the client and on the server, which two cores
run out of long before the disk does. So accepts that arrive while earlier
ones are on the wire wait, and the next free flight takes all of them as
one insert, in one implicit transaction: N callers, one statement, one
commit. A lone caller goes at once.

Each call keeps its own answer: the rows of all the calls in a flight are
decided in call order (a client_message_id repeated by a later call is
decided against the earlier one, as if the calls had run one after the
other). A flight that fails for a reason other than the connection is run
again call by call, so that an error meets only the call it belongs to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from ..._errors import StoreUnavailable
from ..._model import NewRow
from .._base import Outcomes

#: Writes `rows` (one transaction) and returns their outcomes, in order.
Insert = Callable[[Sequence[NewRow]], Awaitable[Outcomes]]


@attrs.define(eq=False)
class _Call:
    rows: Sequence[NewRow]
    done: trio.Event = attrs.Factory(trio.Event)
    taken: bool = False
    #: Set when this call is woken to write a flight (itself and the calls
    #: queued behind it) rather than with its answer.
    flight: list[_Call] | None = None
    outcomes: Outcomes | None = None
    error: BaseException | None = None


class Joiner:
    """Runs accepts in at most `flights` statements at a time, each
    statement taking every accept queued when it starts."""

    def __init__(self, insert: Insert, *, flights: int) -> None:
        self._insert = insert
        self._flights = flights
        self._running = 0
        self._queue: list[_Call] = []
        #: Flights sent, and the accepts they carried (for the benchmark).
        self.statements = 0
        self.calls = 0

    async def accept(self, rows: Sequence[NewRow]) -> Outcomes:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._running and not self._queue:  # alone: no flight to share
            self._running += 1
            self.statements += 1
            self.calls += 1
            try:
                with trio.CancelScope(shield=True):
                    return await self._insert(rows)
            finally:
                self._running -= 1
                if self._queue:
                    following = self._take()
                    following[0].flight = following
                    following[0].done.set()
        call = _Call(rows)
        self._queue.append(call)
        if self._running < self._flights:
            await self._fly(self._take())
        else:
            try:
                await call.done.wait()
            except trio.Cancelled:
                if not call.taken:  # withdrawn: nothing is written behind its back
                    self._queue.remove(call)
                    raise
                with trio.CancelScope(shield=True):  # its write is under way: never abandoned
                    await call.done.wait()
                    if call.flight is not None:
                        await self._fly(call.flight)
                raise
            if call.flight is not None:
                await self._fly(call.flight)
        if call.error is not None:
            raise call.error
        assert call.outcomes is not None
        return call.outcomes

    def _take(self) -> list[_Call]:
        """Every queued call, as the next flight (one slot taken)."""
        calls, self._queue = self._queue, []
        for c in calls:
            c.taken = True
        self._running += 1
        return calls

    async def _fly(self, calls: list[_Call]) -> None:
        """Write `calls` as one (shielded: a write is never abandoned), wake
        them, and hand the calls queued meanwhile to the first of them."""
        try:
            with trio.CancelScope(shield=True):
                await self._write(calls)
        finally:
            self._running -= 1
            for c in calls:
                c.flight = None
                c.done.set()
            if self._queue and self._running < self._flights:
                following = self._take()
                following[0].flight = following
                following[0].done.set()

    async def _write(self, calls: list[_Call]) -> None:
        self.statements += 1
        self.calls += len(calls)
        if len(calls) == 1:
            await self._one(calls[0])
            return
        rows = [r for c in calls for r in c.rows]
        try:
            outcomes = await self._insert(rows)
        except StoreUnavailable as exc:  # the connection, not a row: each call gets it
            for c in calls:
                c.error = exc
            return
        except Exception:  # say a value the server refused: each call alone meets its own
            for c in calls:
                await self._one(c)
            return
        at = 0
        for c in calls:
            c.outcomes = outcomes[at : at + len(c.rows)]
            at += len(c.rows)

    async def _one(self, call: _Call) -> None:
        try:
            call.outcomes = await self._insert(call.rows)
        except Exception as exc:
            call.error = exc
