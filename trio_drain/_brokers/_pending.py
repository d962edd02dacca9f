"""Sends awaiting their ack: who to wake or call back when a broker answers.

`WebSocketBroker` files every send here under its client message id
(`expect`) and hands each ack, the ack deadline's sweep and a lost
connection's failure to it (`resolve`, `expire`, `fail_all`). Each send
hears exactly one answer, or none if its caller stops waiting first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ._wire import SendResult

log = logging.getLogger("trio_drain.broker")


class Waiter:
    """One send awaiting its ack: wakes a task (`send`) or calls back (`start_send`).

    It is also the `SendHandle` that `start_send` returns.
    """

    __slots__ = ("callback", "deadline", "event", "key", "result", "table")

    def __init__(
        self,
        table: PendingAcks,
        key: str,
        deadline: float,
        callback: Callable[[SendResult], None] | None = None,
    ) -> None:
        self.table = table
        self.key = key
        self.deadline = deadline
        self.callback = callback
        self.event = trio.Event() if callback is None else None
        self.result: SendResult | None = None

    def resolve(self, result: SendResult) -> None:
        """Deliver the answer (the first one only) and leave the table."""
        if self.result is not None:
            return
        self.result = result
        self.table.forget(self)
        if self.event is not None:
            self.event.set()
        elif self.callback is not None:
            try:
                self.callback(result)
            except Exception:  # the reader must survive a caller's bug
                log.exception("send result callback failed for %s", self.key)

    def cancel(self) -> None:
        """Stop waiting: the callback will not be called."""
        self.callback = None
        self.table.forget(self)


class PendingAcks:
    """The sends awaiting an ack, by client message id (a resend of an id
    still awaiting its ack waits beside the first)."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[Waiter]] = {}
        self._count = 0

    def __len__(self) -> int:
        """How many sends await their ack."""
        return self._count

    def expect(self, key: str, deadline: float, callback: Callable[[SendResult], None] | None) -> Waiter:
        """File a send of `key` whose ack is due by `deadline` (Trio time)."""
        waiter = Waiter(self, key, deadline, callback)
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = [waiter]
        else:
            waiters.append(waiter)
        self._count += 1
        return waiter

    def forget(self, waiter: Waiter) -> None:
        """Take `waiter` out (a no-op if it is not in)."""
        waiters = self._waiters.get(waiter.key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self._count -= 1
            if not waiters:
                del self._waiters[waiter.key]

    def resolve(self, key: str, result: SendResult) -> bool:
        """Answer every send of `key`; False if none awaits an ack."""
        waiters = self._waiters.get(key)
        if not waiters:
            return False
        if len(waiters) == 1:  # the common case, without copying the list
            waiters[0].resolve(result)
            return True
        for waiter in list(waiters):  # resolving one removes it
            waiter.resolve(result)
        return True

    def expire(self, now: float, result: SendResult) -> int:
        """Answer every send whose deadline is past with `result`; how many."""
        expired = 0
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):  # resolving one removes it
                if waiter.deadline <= now:
                    waiter.resolve(result)
                    expired += 1
        return expired

    def fail_all(self, result: SendResult) -> None:
        """Answer every send with `result` (the connection is gone)."""
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):  # resolving one removes it
                waiter.resolve(result)
