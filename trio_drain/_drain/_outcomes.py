"""Outcomes: what became of each delivery, decided, settled and counted.

A broker's answer, a passed ack deadline, a route that is down or a
stopping worker each map to one transition of the state machine
(`_lifecycle`). The completion goes to the batch completer, and the row's
send slot frees once its batch is written. A refusal for rate paces the
route and gives the row back with its attempt; an ``overloaded`` answer
(the broker has too many sends waiting) is a matter of concurrency, not of
rate: it narrows the window (`_window`) and gives the row back with its
attempt, to go again shortly. Every other answer is a round-trip sample
for the window. A delivery settles once: a
second outcome (an ack racing the sweep that timed it out) changes nothing.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from collections.abc import Callable
from typing import Protocol

import trio

from .. import _crashpoints, _lifecycle
from .._brokers._registry import Unavailable
from .._brokers._wire import SendResult
from .._config import DrainConfig
from .._display import Throttle, bounded, quieted, visible
from .._lifecycle import Completion, RetryPolicy
from .._model import OutboxRow, Status
from .._outbox import Outbox
from ._completer import BatchCompleter
from ._delivery import ACK_TIMEOUT, Delivery, Settled
from ._gates import Gate, Gates
from ._statistics import Counters
from ._window import WindowController

log = logging.getLogger("trio_drain.worker")

#: An overload by its text, for brokers whose errors carry no code.
_OVERLOADED_TEXT = re.compile(r"\boverloaded\b", re.I)


def is_overload(result: SendResult) -> bool:
    """Whether a refusal says the broker has too many sends waiting (code
    ``overloaded``, or that word in an error without a code), as opposed to
    a rate limit."""
    if result.code is not None:
        return result.code == "overloaded"
    return _OVERLOADED_TEXT.search((result.error or "").split(" (", 1)[0]) is not None


class DeliveryObserver(Protocol):
    """Told of each answer and each delivered row, for metrics (`_metrics`).
    Called on the Trio thread, on the hot path: must be quick and not block."""

    def answered(self, route_name: str, seconds: float) -> None:
        """The broker answered a send on `route_name`, `seconds` after it went."""

    def delivered(self, row: OutboxRow, completion: Completion) -> None:
        """`row` is done, as `completion` wrote it."""


class Outcomes:
    """Settles the worker's deliveries: each one's completion goes to the
    completer, and what the written batch freed is kept for the worker."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        config: DrainConfig,
        policy: RetryPolicy,
        rng: random.Random,
        completer: BatchCompleter,
        gates: Gates,
        out: set[Delivery],
        counters: Counters,
        throttle: Throttle,
        wake: Callable[[], None],
        window: WindowController | None = None,
    ) -> None:
        self._outbox = outbox
        self._config = config
        self._policy = policy
        self._rng = rng
        self._completer = completer
        self._gates = gates
        self._out = out  # the worker's table of rows claimed and not yet settled
        self._counters = counters
        self._throttle = throttle
        self._wake = wake
        self._window = window  # None: the window is held at max_inflight
        #: Called with each row that reached a final state or was rescheduled.
        self.on_completion: Callable[[Completion], None] | None = None
        #: Told of answers and delivered rows (None: nobody asks, no cost).
        self.observer: DeliveryObserver | None = None
        # The batch of outcomes being written: the slots it frees, and the
        # gates whose held rows may go once it is.
        self._freed: list[object] = []
        self._unheld: set[Gate] = set()
        self._all_settled: trio.Event | None = None  # someone waits for no row to be out

    def on_result(self, delivery: Delivery, result: SendResult) -> None:
        """The broker answered (or the ack deadline passed): decide the row's fate."""
        if delivery not in self._out:
            return  # settled already (timed out, or handed back)
        _crashpoints.reached("ack_before_record")
        row, gate = delivery.row, delivery.gate
        assert gate is not None
        now = self._outbox.clock()
        if result.rate_limited:
            if is_overload(result):
                self._overloaded(delivery, gate, result)
            else:
                self._rate_limited(delivery, gate, result)
        else:
            at = trio.current_time()
            gate.pacer.answered(at, accepted=result.ok)
            if self._window is not None and not result.unanswered:
                self._window.answered(at, at - delivery.sent_at)
            if self.observer is not None and not result.unanswered:
                self.observer.answered(delivery.route_name, at - delivery.sent_at)
            if result.ok:
                completion = _lifecycle.on_ack(row, broker_message_id=result.message_id or "", now=now)
                if result.duplicate:
                    self._counters.count("duplicates", delivery.route_name)
            elif result.unanswered:
                completion = _lifecycle.on_no_answer(
                    row,
                    reason=result.error or "no_answer",
                    now=now,
                    policy=self._policy,
                    jitter=self._rng.random(),
                )
            else:
                completion = _lifecycle.on_error(
                    row,
                    error=result.error or "unknown_error",
                    permanent=result.permanent,
                    now=now,
                    policy=self._policy,
                    jitter=self._rng.random(),
                )
            if completion.status is Status.DEAD:
                self._warn_dead(row, completion, gate.name)
            self.settle(delivery, completion, Settled.RESULT, delivery.route_name)
        if gate.held:
            # Released once this batch of outcomes is written, not now: a
            # refusal later in the same burst of answers must be seen first,
            # or slow start would send more into a broker already refusing.
            self._unheld.add(gate)

    def _warn_dead(self, row: OutboxRow, completion: Completion, route_name: str) -> None:
        """A row went dead: say so, but not ten thousand times a minute."""
        quiet = self._throttle(("dead", route_name))
        if quiet is not None:
            log.warning(
                "row %s is dead: %s%s", row.id, bounded(completion.last_error or "", 300), quieted(quiet)
            )

    def _rate_limited(self, delivery: Delivery, gate: Gate, result: SendResult) -> None:
        """The broker refused the send for its rate: pace the route, give the row back."""
        text = result.error or "rate_limited"
        self._counters.count("rate_limited", gate.name)
        was_paced = gate.pacer.paced
        if gate.pacer.refused(trio.current_time(), sent_at=delivery.sent_at, text=text):
            log.log(
                logging.INFO if was_paced else logging.WARNING,
                "route %s is rate limited by its broker (%s); pacing it at %.3g sends/s",
                visible(gate.name),
                bounded(text, 120),
                gate.pacer.rate,
            )
            for (
                sibling
            ) in self._gates.by_route.values():  # slow start is over: they wait their turn unclaimed
                while sibling.pacer is gate.pacer and sibling.held:
                    self.pace_back(sibling.held.popleft(), sibling, "route_paced")
        self.pace_back(delivery, gate, text)

    def _overloaded(self, delivery: Delivery, gate: Gate, result: SendResult) -> None:
        """The broker has too many sends waiting: narrow the window, and give
        the row back (attempt returned) to go again after `route_retry`."""
        text = result.error or "overloaded"
        self._counters.count("rate_limited", gate.name)
        at = trio.current_time()
        gate.pacer.answered(at, accepted=False)  # an answer all the same: slow start moves on
        if self._window is not None:
            self._window.overloaded(at, sent_at=delivery.sent_at, in_flight=self._completer.in_flight())
        quiet = self._throttle(("overloaded", gate.name))
        if quiet is not None:
            log.info(
                "route %s: the broker is overloaded (%s); %s%s",
                visible(gate.name),
                bounded(text, 120),
                "narrowing the send window" if self._window is not None else "the window is fixed",
                quieted(quiet),
            )
        now = self._outbox.clock()
        completion = _lifecycle.on_rate_limited(
            delivery.row, error=text, now=now, retry_at=now + self._policy.route_retry_ms
        )
        self.settle(delivery, completion, Settled.GIVEN_BACK, gate.name)

    def pace_back(self, delivery: Delivery, gate: Gate, error: str) -> None:
        """Give a row back, attempt returned, until its paced route may send."""
        now = trio.current_time()
        retry_at = self._outbox.clock() + math.ceil((gate.pacer.next_send_at(now) - now) * 1000)
        completion = _lifecycle.on_rate_limited(
            delivery.row, error=error, now=self._outbox.clock(), retry_at=retry_at
        )
        self.settle(delivery, completion, Settled.GIVEN_BACK, gate.name)

    def give_back(self, delivery: Delivery, route: Unavailable) -> None:
        """The row's route is down: block the route, give the row back, attempt returned."""
        self._gates.block(route)
        completion = _lifecycle.on_route_unavailable(
            delivery.row, now=self._outbox.clock(), policy=self._policy
        )
        self._counters.count("unavailable", route.name)
        self.settle(delivery, completion, Settled.GIVEN_BACK, route.name)

    def hand_back(self, deliveries: list[Delivery]) -> None:
        """Stopping: these rows go back to pending (sync: no checkpoint),
        those never sent with their attempt returned."""
        now = self._outbox.clock()
        for delivery in deliveries:
            if delivery.handle is not None:
                delivery.handle.cancel()
            gate = delivery.gate
            if gate is not None and not delivery.sent and delivery in gate.held:
                gate.held.remove(delivery)
            completion = _lifecycle.on_released(
                delivery.row, sent=delivery.sent, now=now, policy=self._policy
            )
            kind = Settled.RELEASED if delivery.sent else Settled.GIVEN_BACK
            self.settle(delivery, completion, kind, delivery.route_name)

    async def expire_overdue(self) -> None:
        """Fail pipelined sends whose ack is overdue, as transient `ack_timeout`.

        One sweep every quarter of the timeout (at most a second) instead of
        a cancel scope per send.
        """
        while True:
            await trio.sleep(min(1.0, self._config.ack_timeout / 4))
            now = trio.current_time()
            for delivery in [d for d in self._out if d.deadline <= now]:
                if delivery.handle is not None:
                    delivery.handle.cancel()
                self.on_result(delivery, ACK_TIMEOUT)
            # Rows slow start held while their broker stopped answering: back
            # they go (attempt returned) before their lease can run out.
            stuck = [d for d in self._out if not d.sent and d.held_since + self._config.ack_timeout <= now]
            if stuck:
                self.hand_back(stuck)

    async def wait_all_settled(self) -> None:
        """Return once no row is out (every one settled)."""
        if not self._out:
            return
        self._all_settled = event = trio.Event()
        try:
            await event.wait()
        finally:
            self._all_settled = None

    def settle(self, delivery: Delivery, completion: Completion, kind: Settled, route_name: str) -> None:
        """Hand the row's completion to the batch completer; its slot frees once written.

        Once per delivery: a second outcome (say, an ack racing the sweep
        that timed it out) changes nothing.
        """
        if delivery not in self._out:
            return
        self._out.remove(delivery)
        if delivery.counted:
            delivery.counted = False
            assert delivery.gate is not None
            delivery.gate.pacer.unanswered -= 1
        if not self._out and self._all_settled is not None:
            self._all_settled.set()
        self._completer.submit(
            completion, functools.partial(self._recorded, delivery, completion, kind, route_name)
        )

    def batch_written(self) -> tuple[list[object], set[Gate]]:
        """Take what the batch just written left: the send slots it freed,
        and the gates whose held rows may go now."""
        freed, self._freed = self._freed, []
        unheld, self._unheld = self._unheld, set()
        return freed, unheld

    def _recorded(
        self,
        delivery: Delivery,
        completion: Completion,
        kind: Settled,
        route_name: str,
        applied: bool | None,
    ) -> None:
        self._freed.append(delivery.slot)  # freed (or refilled) once the whole batch is through
        if applied is None:
            return  # the completer logged it; the lease will bring the row back
        if not applied:
            self._counters.totals["stale"] += 1
            log.warning("row %s: lease was taken over; completion ignored", completion.row_id)
            return
        if kind is Settled.RELEASED:
            return
        if kind is Settled.GIVEN_BACK:
            self._counters.totals["given_back"] += 1
        elif completion.status is Status.DONE:
            self._counters.count("acked", route_name)
            if self.observer is not None:
                self.observer.delivered(delivery.row, completion)
        elif completion.status is Status.DEAD:
            self._counters.count("dead", route_name)
        else:
            self._counters.count("retried", route_name)
        if completion.status is Status.PENDING:
            self._wake()  # the loop may be asleep past this row's new due time
        if self.on_completion is not None:
            self.on_completion(completion)
