"""The drain worker: claims due rows and delivers them, many at a time.

One loop task claims rows, as many as there are free send slots (at most
half the window per claim), and starts each row's delivery. Send slots are
tokens of a `trio.CapacityLimiter` acquired on each delivery's behalf, so
no row is claimed that cannot be sent at once. Its size is the window: with
`DrainConfig.adaptive` the `_window` controller sets it from round trips,
throughput and ``overloaded`` answers (between a small floor and
`max_inflight`), else it stays `max_inflight`. When
nothing is due, the loop sleeps until the next row is due, a wakeup arrives
on its memory channel (an accept, a broker connection opening), or
`poll_interval` passes (the backstop for rows written by other processes).

A slot is free only once its row's outcome is written (so a crash resends
at most the window's worth of rows). While rows are due, the transaction that
writes a batch of outcomes also claims rows for the slots it frees, and
they go out as soon as it commits: one round trip to the database per
batch, not two, and no wait for the loop to wake.

The rooms next door: `_sending` routes and sends each row, `_outcomes`
decides and settles what became of it, `_gates` holds each route's state
(down, slow start, paced), `_completer` writes outcomes in batches,
`_window` decides the window, and `_statistics` counts.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .. import _crashpoints
from .._brokers._registry import BrokerRegistry
from .._config import DrainConfig
from .._display import Throttle
from .._errors import StoreError, TrioDrainError
from .._ids import new_token
from .._lifecycle import Completion, releases_lane
from .._model import OutboxRow
from .._outbox import Outbox
from .._store._base import Applied, RouteKey
from ._completer import BatchCompleter
from ._delivery import Delivery
from ._gates import Gates
from ._outcomes import Outcomes
from ._sending import Sender
from ._statistics import Counters, WorkerStatistics
from ._window import WindowController

log = logging.getLogger("trio_drain.worker")

#: The log tells of a window change once it is this factor (or its inverse)
#: away from the last window it told of, and at most every this many seconds.
WINDOW_LOG_FACTOR = 2.0
WINDOW_LOG_EVERY = 10.0


class DrainWorker:
    """Delivers outbox rows through a broker registry until cancelled.

    Start it in a nursery: ``nursery.start_soon(worker.run)`` or
    ``await nursery.start(worker.run)`` (which returns once expired leases
    are recovered and the worker is looking for rows). Cancel the nursery
    to stop it: rows claimed but not yet sent, and rows sent but not yet
    acked, go straight back to `pending` (the former with their attempt
    given back), in a shielded, bounded cleanup.
    """

    def __init__(
        self,
        outbox: Outbox,
        registry: BrokerRegistry,
        config: DrainConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox
        self.registry = registry
        self.config = config if config is not None else DrainConfig()
        self._policy = self.config.policy
        self._wake_send, self._wake_receive = trio.open_memory_channel[None](1)
        # The window's policy (None: held at max_inflight), and its mechanism.
        self._window = WindowController(ceiling=self.config.max_inflight) if self.config.adaptive else None
        window = self.config.max_inflight if self._window is None else self._window.window
        self._limiter = trio.CapacityLimiter(window)
        self._claim_size = self._claim_size_for(window)
        self._logged_window, self._window_logged_at = window, -math.inf
        self._completer = BatchCompleter(
            outbox,
            in_flight=lambda: self._limiter.borrowed_tokens,
            write=self._write_outcomes,
            after_batch=self._after_batch,
        )
        self._counters = Counters()
        # Every route a row went out through, with its pacing, and the
        # routes that are down.
        self._gates = Gates(window=self.config.max_inflight)
        # Rows claimed and not yet handed to the completer.
        self._out: set[Delivery] = set()
        throttle = Throttle()
        self._outcomes = Outcomes(
            outbox=outbox,
            config=self.config,
            policy=self._policy,
            rng=rng if rng is not None else random.Random(),
            completer=self._completer,
            gates=self._gates,
            out=self._out,
            counters=self._counters,
            throttle=throttle,
            wake=self.wake,
            window=self._window,
        )
        self._sender = Sender(
            registry=registry,
            outbox=outbox,
            config=self.config,
            policy=self._policy,
            gates=self._gates,
            out=self._out,
            outcomes=self._outcomes,
            counters=self._counters,
            throttle=throttle,
        )
        # The rows claimed in the transaction that writes the current batch
        # of outcomes, to take the slots it frees.
        self._refill: list[OutboxRow] = []
        # Did the last claim find all it asked for (or has a wake come since)?
        # Then more rows may be due, and writing outcomes claims too.
        self._maybe_more_due = True
        self._tasks: trio.Nursery | None = None
        self._stopping = False
        self._running = False
        # stop(): the claim loop's scope.
        self._claims: trio.CancelScope | None = None
        self._stop_requested = False

    # -- public

    @property
    def on_completion(self) -> Callable[[Completion], None] | None:
        """Called with each row that reached a final state or was
        rescheduled; used by the CLI for progress. Must not block."""
        return self._outcomes.on_completion

    @on_completion.setter
    def on_completion(self, callback: Callable[[Completion], None] | None) -> None:
        self._outcomes.on_completion = callback

    def wake(self) -> None:
        """Look at the outbox now. Never blocks; many wakes coalesce into one."""
        self._maybe_more_due = True
        for gate in self._gates.by_route.values():
            gate.maybe_more = True
        try:
            self._wake_send.send_nowait(None)
        except trio.WouldBlock:
            pass

    def stop(self) -> None:
        """Stop gracefully, without cancelling anything: claim nothing more,
        give back (attempt returned) rows claimed but not yet sent, and let
        `run` return once every row already sent is answered and recorded.

        Never blocks. Bound the wait yourself, and cancel `run` if the
        brokers take too long: what is still unanswered then goes back to
        `pending` at once (``trio-drain run`` does this within
        `DrainConfig.shutdown_timeout`).
        """
        self._stop_requested = True
        self._stopping = True
        if self._claims is not None:
            self._claims.cancel()

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of the worker's counters."""
        return self._counters.snapshot(
            in_flight=self._limiter.borrowed_tokens,
            window=int(self._limiter.total_tokens),
            blocked_routes=tuple(sorted(self._gates.blocked.values())),
            rate=self._gates.rate,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain until cancelled. See the class docstring."""
        if self._running:
            raise TrioDrainError("this DrainWorker is already running")
        self._running = True
        self._stopping = self._stop_requested = False
        self.outbox.add_listener(self.wake)
        self.registry.add_listener(self.wake)
        try:
            try:
                await self._maintain()
            except StoreError as exc:  # the loop keeps retrying; no need to die
                log.error("outbox unavailable at start (%s); will retry", exc)
            async with trio.open_nursery() as nursery:
                # The completer outlives every delivery: it stops only when
                # closed, after the tasks nursery has exited and every row
                # still out has been handed back to it.
                await nursery.start(self._completer.run)
                try:
                    async with trio.open_nursery() as self._tasks:
                        self._tasks.start_soon(self.outbox.watch, self.wake)
                        self._tasks.start_soon(self._outcomes.expire_overdue)
                        task_status.started()
                        await self._loop()
                finally:
                    self._tasks = None
                    self._outcomes.hand_back(list(self._out))  # sync: no checkpoint
                    self._completer.close()
        finally:
            self.outbox.remove_listener(self.wake)
            self.registry.remove_listener(self.wake)
            self._running = False

    # -- the loop

    async def _loop(self) -> None:
        try:
            with trio.CancelScope() as self._claims:
                if not self._stop_requested:
                    await self._claim_loop()
        finally:
            # From here on, rows that a batch of outcomes claims go straight
            # back (the other tasks may take a moment to stop).
            self._stopping = True
            self._claims = None
        # stop(): rows not yet sent go back now; those sent wait for their answer.
        self._outcomes.hand_back([d for d in self._out if not d.sent])
        await self._outcomes.wait_all_settled()
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()

    async def _claim_loop(self) -> None:
        config = self.config
        tasks = self._tasks
        assert tasks is not None
        next_maintenance = trio.current_time() + config.maintenance_interval
        failures = 0
        while True:
            slots = await self._take_slots()
            self._drain_wakes()
            self._gates.reopen(self.registry)
            rows: list[OutboxRow] = []
            error: StoreError | None = None
            try:
                if trio.current_time() >= next_maintenance:
                    await self._maintain()
                    next_maintenance = trio.current_time() + config.maintenance_interval
                # Shielded: a claim that commits must reach the table of
                # deliveries, from which a stopping worker hands rows back.
                with trio.CancelScope(shield=True):
                    await self._claim_into(rows, len(slots))
            except StoreError as exc:
                error = exc
            finally:
                # Whatever happened (cancelled in maintenance, too), every
                # slot becomes a delivery or goes back to the limiter.
                deliveries = self._claimed(rows, slots)
            # Stopping already? Then nothing leaves, and every attempt is given back.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._sender.launch(deliveries, tasks)
            if error is not None:
                failures += 1
                delay = min(config.poll_interval * 2 ** min(failures, 6), 5.0)
                log.error("outbox unavailable (%s); retrying in %.1fs", error, delay)
                await trio.sleep(delay)
                continue
            if failures:
                log.warning("outbox available again after %d failed attempt(s)", failures)
            failures = 0
            if self._maybe_more_due:
                continue  # there may be more due right now
            await self._sleep_until_due(next_maintenance)

    async def _claim_into(self, rows: list[OutboxRow], room: int) -> None:
        """Claim up to `room` rows into `rows`: first each paced route's own
        share (no more than its bucket allows), then the rest in one claim
        that leaves paced and blocked routes out."""
        await self._gates.claim_shares(
            rows, room, claim=self._claim_route, poll_interval=self.config.poll_interval
        )
        free = room - len(rows)
        if free:
            found = await self.outbox.claim(**self._claim_terms(free))
            self._maybe_more_due = len(found) == free
            if self._window is not None:
                self._window.claimed(full=self._maybe_more_due)
            rows.extend(found)

    def _claim_route(self, limit: int, key: RouteKey) -> Awaitable[list[OutboxRow]]:
        return self.outbox.claim(**self._claim_terms(limit, only=key))

    def _claim_terms(self, limit: int, *, only: RouteKey | None = None) -> dict[str, Any]:
        """What a claim asks for now: up to `limit` rows, under the policy's
        lease and age limit, a fresh token, blocked and paced routes left
        out (or only the route `only`)."""
        return {
            "limit": limit,
            "lease_ms": self._policy.lease_ms,
            "max_age_ms": self._policy.max_age_ms,
            "token": new_token(),
            "exclude": self._gates.route_filter(only),
        }

    async def _take_slots(self) -> list[object]:
        """Wait for one free send slot, then take up to a claim's worth that are free."""
        first = object()
        await self._limiter.acquire_on_behalf_of(first)
        slots = [first]
        while len(slots) < self._claim_size:
            slot = object()
            try:
                self._limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                break
            slots.append(slot)
        return slots

    def _drain_wakes(self) -> None:
        while True:
            try:
                self._wake_receive.receive_nowait()
            except trio.WouldBlock:
                return

    async def _sleep_until_due(self, next_maintenance: float) -> None:
        now = trio.current_time()
        # A paced route with rows waits for its next token, not the next poll.
        timeout = min(self.config.poll_interval, next_maintenance - now, self._gates.next_token_at(now) - now)
        try:
            due = await self.outbox.next_due_at(
                max_age_ms=self._policy.max_age_ms, exclude=self._gates.route_filter()
            )
        except StoreError as exc:  # the next claim reports it and backs off
            log.debug("cannot read the next due time (%s)", exc)
            due = None
        if due is not None:
            timeout = min(timeout, (due - self.outbox.clock()) / 1000)
        if timeout <= 0:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(timeout):
            await self._wake_receive.receive()

    async def _maintain(self) -> None:
        recovered = await self.outbox.recover_expired_leases(
            max_attempts=self._policy.max_attempts, unknown_fate=self._policy.unknown_fate
        )
        expired = await self.outbox.expire_stale(max_age_ms=self._policy.max_age_ms)
        if recovered:
            log.warning("recovered %d row(s) whose lease expired", recovered)
        if expired:
            log.warning("%d pending row(s) passed max_age and went dead (expired)", expired)

    def _claimed(self, rows: list[OutboxRow], slots: list[object]) -> list[Delivery]:
        """Claimed rows become deliveries, each with a slot; spare slots are freed."""
        if rows:
            _crashpoints.reached("claim_after_commit")
        self._counters.totals["claimed"] += len(rows)
        deliveries = [Delivery(row, slot) for row, slot in zip(rows, slots, strict=False)]
        self._out.update(deliveries)
        for slot in slots[len(rows) :]:
            self._limiter.release_on_behalf_of(slot)
        return deliveries

    # -- outcomes, written in batches

    async def _write_outcomes(self, completions: Sequence[Completion]) -> Applied:
        """The completer's write: record a batch of outcomes and, while rows
        may be due, claim as many as the batch frees slots for, in the same
        transaction (`_after_batch` hands the slots over)."""
        # No more rows than the window has room for once the batch frees its
        # slots: when the window shrank, the slots it frees stay free.
        room = int(self._limiter.total_tokens) - (self._limiter.borrowed_tokens - len(completions))
        limit = min(len(completions), self._claim_size, room)
        if not self._maybe_more_due and any(releases_lane(c) for c in completions):
            # A lane's head leaving lets its next row go, in this very
            # transaction: claim it here rather than at the next wake.
            self._maybe_more_due = True
        if self._stopping or not self._maybe_more_due or limit < 1:
            return await self.outbox.complete(completions)
        self._gates.reopen(self.registry)
        applied, self._refill = await self.outbox.complete_and_claim(completions, **self._claim_terms(limit))
        self._maybe_more_due = len(self._refill) == limit
        if self._window is not None:
            self._window.claimed(full=self._maybe_more_due)
        return applied

    def _after_batch(self) -> None:
        """A batch is written and its callbacks have run: the slots it freed
        go to the rows claimed with it, the rest back to the limiter; slow
        start lets held rows go as far as the batch's answers allow."""
        freed, unheld = self._outcomes.batch_written()
        rows, self._refill = self._refill, []
        if self._window is not None:
            self._resize(self._window)
        tasks = self._tasks
        for gate in unheld:
            if tasks is not None and not self._stopping:
                self._sender.release_held(gate, tasks)
            if not gate.held and not self._stopping:
                # Its rows were left out of claims while it held some: look
                # again now, not at the next poll.
                self.wake()
        deliveries = self._claimed(rows, freed)
        if self._stopping:  # nothing leaves: straight back, attempts returned
            self._outcomes.hand_back(deliveries)
        else:
            assert tasks is not None
            self._sender.launch(deliveries, tasks)

    # -- the window

    def _claim_size_for(self, window: int) -> int:
        # Half the window at most: claiming it all at once makes every row
        # wait for the slowest of the whole window at each step (claim,
        # send, ack, record), where two groups overlap one another's waits
        # (measured: 1.3x the rows per second at a window of 64).
        return min(self.config.batch_size, max(1, window // 2))

    def _resize(self, controller: WindowController) -> None:
        """Give the limiter the window the controller decided. A narrower
        window takes effect as sends come back: no slot is taken back."""
        window = controller.window
        if window == self._limiter.total_tokens:
            return
        self._limiter.total_tokens = window
        self._claim_size = self._claim_size_for(window)
        now = trio.current_time()
        logged = self._logged_window
        if (
            max(window, logged) >= WINDOW_LOG_FACTOR * min(window, logged)
            and now - self._window_logged_at >= WINDOW_LOG_EVERY
        ):
            log.info("send window %d -> %d: %s", logged, window, controller.reason)
            self._logged_window, self._window_logged_at = window, now
