"""The drain worker: claims due rows and delivers them, many at a time.

One loop task claims rows, as many as there are free send slots (at most
half the window per claim), and starts each row's delivery. Send slots are
tokens of a `trio.CapacityLimiter` (`max_inflight`) acquired on each
delivery's behalf, so no row is claimed that cannot be sent at once. When
nothing is due, the loop sleeps until the next row is due, a wakeup arrives
on its memory channel (an accept, a broker connection opening), or
`poll_interval` passes (the backstop for rows written by other processes).

A delivery is a small record, not a task: a `PipelinedBroker` (such as
`WebSocketBroker`) queues the frame at once and calls back with the ack;
the outcome goes to the batch completer with a callback. Per row that is no
task, no cancel scope and no event; a batch of acks costs one task switch.
Brokers with only `send` get a task per row. The worker keeps the table of
deliveries, so on cancellation it hands back every row still out, sent or
not.

A slot is free only once its row's outcome is written (so a crash resends
at most `max_inflight` rows). While rows are due, the transaction that
writes a batch of outcomes also claims rows for the slots it frees, and
they go out as soon as it commits: one round trip to the database per
batch, not two, and no wait for the loop to wake.

Rows whose route is down are not claimed at all until the route is back, so
an outage costs neither CPU nor attempts. A broker's rate limit is
back-pressure too: the refused row gets its attempt back and its route is
paced (`_pacing.RoutePacer`: slow start, then a token bucket that learns
the broker's rate). A paced route's rows are left out of the common claim
and claimed on their own, no more at a time than its bucket allows, so
pacing costs no churn of rows claimed and given back.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import trio

from .. import _crashpoints, _lifecycle
from .._brokers._pacing import RoutePacer
from .._brokers._registry import BrokerRegistry, NoBroker, Ready, SendHandle, Unavailable
from .._brokers._wire import OutgoingMessage, SendResult, outgoing_message, unsendable
from .._config import DrainConfig
from .._display import Throttle, bounded, quieted, visible
from .._errors import BrokerUnavailable, StoreError, TrioDrainError
from .._ids import new_token
from .._lifecycle import Completion
from .._model import OutboxRow, Status
from .._outbox import Outbox
from .._store._base import Applied, RouteFilter, RouteKey
from ._completer import BatchCompleter

log = logging.getLogger("trio_drain.worker")


@attrs.frozen(kw_only=True)
class RouteStatistics:
    """Counters of one route (a mesh or a session connection)."""

    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    retried: int = 0
    dead: int = 0
    unavailable: int = 0
    rate_limited: int = 0
    #: Sends a second the route is paced to, or None while it is not paced.
    rate: float | None = None


@attrs.frozen(kw_only=True)
class WorkerStatistics:
    """A snapshot of a worker's counters (since it was created).

    Attributes:
        claimed: rows claimed from the outbox.
        sent: sends handed to a broker.
        acked: rows that reached `done` (duplicates included).
        duplicates: acks the broker marked as duplicates of an earlier send.
        retried: transient failures scheduled for another try.
        dead: rows this worker moved to `dead`.
        given_back: claims returned with their attempt (route down, rate
            limited, stopping).
        rate_limited: sends the broker refused for its rate or its load.
        stale: completions that found their lease taken over (changed nothing).
        in_flight: sends outstanding right now.
        blocked_routes: routes whose rows are left alone until they reopen.
        per_route: the same counters per route name.
    """

    claimed: int
    sent: int
    acked: int
    duplicates: int
    retried: int
    dead: int
    given_back: int
    rate_limited: int
    stale: int
    in_flight: int
    blocked_routes: tuple[str, ...]
    per_route: dict[str, RouteStatistics]


_RouteField = Literal["sent", "acked", "duplicates", "retried", "dead", "unavailable", "rate_limited"]
_ROUTE_FIELDS = tuple(a.name for a in attrs.fields(RouteStatistics) if a.name != "rate")
# The worker-wide counters: every int field of WorkerStatistics but the live ones.
_WORKER_COUNTERS = tuple(
    a.name for a in attrs.fields(WorkerStatistics) if a.type in (int, "int") and a.name != "in_flight"
)


_ACK_TIMEOUT = SendResult.no_answer("ack_timeout")


class _Settled(enum.Enum):
    """How a delivery ended, for the counters."""

    RESULT = "result"  # the broker answered (or the ack deadline passed), or no broker exists
    GIVEN_BACK = "given_back"  # never sent: back with its attempt returned
    RELEASED = "released"  # sent, then the worker stopped before the answer


class _Delivery:
    """One claimed row on its way out, held until its outcome is handed on."""

    __slots__ = (
        "counted",
        "deadline",
        "gate",
        "handle",
        "held_since",
        "route",
        "route_name",
        "row",
        "sent",
        "sent_at",
        "slot",
    )

    def __init__(self, row: OutboxRow, slot: object) -> None:
        self.row = row
        self.slot = slot  # its CapacityLimiter token
        self.route_name = ""
        self.sent = False  # the frame may have left
        self.sent_at = math.inf  # trio time
        self.handle: SendHandle | None = None  # a pipelined send's, to cancel
        self.deadline = math.inf  # a pipelined send's ack deadline (trio time)
        self.gate: _Gate | None = None  # its route's pacing, once routed
        self.route: Ready | None = None
        self.held_since = math.inf  # waiting for its route's slow start (trio time)
        self.counted = False  # in its pacer's unanswered count (from _send until settled)


class _Gate:
    """One route's pacing: its pacer, its unanswered sends, and the rows
    claimed for it that wait for slow start to let them go."""

    __slots__ = ("held", "key", "last_claim", "maybe_more", "name", "pacer")

    def __init__(self, name: str, key: RouteKey, pacer: RoutePacer) -> None:
        self.name = name
        self.key = key
        self.pacer = pacer
        self.held: collections.deque[_Delivery] = collections.deque()
        self.maybe_more = True  # rows of this route may be due (paced routes)
        self.last_claim = -math.inf  # trio time of its last claim of its own


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
        self._rng = rng if rng is not None else random.Random()
        self._wake_send, self._wake_receive = trio.open_memory_channel[None](1)
        self._limiter = trio.CapacityLimiter(self.config.max_inflight)
        # Half the window at most: claiming it all at once makes every row
        # wait for the slowest of the whole window at each step (claim,
        # send, ack, record), where two groups overlap one another's waits
        # (measured: 1.3x the rows per second at a window of 64).
        self._claim_size = min(self.config.batch_size, max(1, self.config.max_inflight // 2))
        self._completer = BatchCompleter(
            outbox,
            in_flight=lambda: self._limiter.borrowed_tokens,
            write=self._write_outcomes,
            after_batch=self._after_batch,
        )
        # Blocked routes: (kind, key) as understood by BrokerRegistry.
        self._blocked: dict[RouteKey, str] = {}
        # Every route a row went out through, with its pacing, and those
        # whose held rows may go once the batch of outcomes is written.
        self._gates: dict[RouteKey, _Gate] = {}
        self._pacers: dict[object, RoutePacer] = {}
        self._unheld: set[_Gate] = set()
        # Rows claimed and not yet handed to the completer.
        self._out: set[_Delivery] = set()
        # The batch of outcomes being written: the slots it frees, and the
        # rows claimed in the same transaction to take them.
        self._freed: list[object] = []
        self._refill: list[OutboxRow] = []
        # Did the last claim find all it asked for (or has a wake come since)?
        # Then more rows may be due, and writing outcomes claims too.
        self._maybe_more_due = True
        self._tasks: trio.Nursery | None = None
        self._stopping = False
        self._running = False
        # stop(): the claim loop's scope, and set when no row is out.
        self._claims: trio.CancelScope | None = None
        self._stop_requested = False
        self._idle = trio.Event()
        self._counts: dict[str, int] = dict.fromkeys(_WORKER_COUNTERS, 0)
        self._throttle = Throttle()
        self._per_route: dict[str, dict[str, int]] = {}
        #: Called with each row that reached a final state or was rescheduled;
        #: used by the CLI for progress. Must not block.
        self.on_completion: Callable[[Completion], None] | None = None

    # -- public

    def wake(self) -> None:
        """Look at the outbox now. Never blocks; many wakes coalesce into one."""
        self._maybe_more_due = True
        for gate in self._gates.values():
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
        return WorkerStatistics(
            **self._counts,
            in_flight=self._limiter.borrowed_tokens,
            blocked_routes=tuple(sorted(self._blocked.values())),
            per_route={
                name: RouteStatistics(**c, rate=self._route_rate(name)) for name, c in self._per_route.items()
            },
        )

    def _route_rate(self, name: str) -> float | None:
        rates = [g.pacer.rate for g in self._gates.values() if g.name == name and g.pacer.rate is not None]
        return min(rates) if rates else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain until cancelled. See the class docstring."""
        if self._running:
            raise TrioDrainError("this DrainWorker is already running")
        self._running = True
        self._stopping = self._stop_requested = False
        self._idle = trio.Event()
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
                        self._tasks.start_soon(self._expire_overdue)
                        task_status.started()
                        await self._loop()
                finally:
                    self._tasks = None
                    self._hand_back_all()
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
        self._hand_back([d for d in self._out if not d.sent])
        if self._out:
            await self._idle.wait()
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()

    async def _claim_loop(self) -> None:
        config = self.config
        next_maintenance = trio.current_time() + config.maintenance_interval
        failures = 0
        while True:
            slots = await self._take_slots()
            self._drain_wakes()
            self._refresh_blocked()
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
            self._launch(deliveries)
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
        now = trio.current_time()
        granted: dict[int, int] = {}  # per pacer: what this pass's claims took (routes may share one)
        for gate in list(self._gates.values()):
            if gate.pacer.rest(now):
                log.info(
                    "route %s sent nothing for %.0fs: pacing ends until the broker refuses again",
                    visible(gate.name),
                    gate.pacer.idle_after,
                )
            if len(rows) >= room or not gate.pacer.paced or gate.key in self._blocked:
                continue
            if not gate.maybe_more and now - gate.last_claim < self.config.poll_interval:
                continue
            allowance = gate.pacer.allowance(now) - granted.get(id(gate.pacer), 0)
            limit = min(allowance, room - len(rows))
            if limit < 1:
                continue
            found = await self.outbox.claim(**self._claim_terms(limit, only=gate.key))
            granted[id(gate.pacer)] = granted.get(id(gate.pacer), 0) + len(found)
            gate.maybe_more = len(found) == limit
            gate.last_claim = now
            if gate.maybe_more and limit == allowance:
                gate.pacer.held_back(now)  # more is due than the bucket lets go
            rows.extend(found)
        free = room - len(rows)
        if free:
            found = await self.outbox.claim(**self._claim_terms(free))
            self._maybe_more_due = len(found) == free
            rows.extend(found)

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
        timeout = min(self.config.poll_interval, next_maintenance - now)
        for gate in self._gates.values():  # a paced route with rows waits for its next token
            if gate.pacer.paced and gate.maybe_more and gate.key not in self._blocked:
                timeout = min(timeout, gate.pacer.next_send_at(now) - now)
        try:
            due = await self.outbox.next_due_at(
                max_age_ms=self._policy.max_age_ms, exclude=self._route_filter()
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

    # -- blocked routes

    def _route_filter(self, only: RouteKey | None = None) -> RouteFilter:
        """What a claim leaves out: blocked routes, and paced ones (each is
        claimed on its own), unless it claims the one route `only`."""
        if only is not None:
            return RouteFilter(only=only)
        # Paced routes are claimed on their own; a route in slow start that
        # already holds rows takes no more until they go (else it would sit
        # on the window's slots while other routes wait).
        own = [key for key, gate in self._gates.items() if gate.pacer.paced or gate.held]
        return RouteFilter.of([*self._blocked, *own])

    def _refresh_blocked(self) -> None:
        for key in list(self._blocked):
            if not self.registry.route_unavailable(*key):
                name = self._blocked.pop(key)
                log.warning("route %s is back; resuming its rows", visible(name))

    def _block(self, route: Unavailable) -> None:
        key = (route.kind, route.key)
        if key not in self._blocked:
            log.warning("route %s is down; leaving its rows until it is back", visible(route.name))
            self._blocked[key] = route.name

    def _claim_terms(self, limit: int, *, only: RouteKey | None = None) -> dict[str, Any]:
        """What a claim asks for now: up to `limit` rows, under the policy's
        lease and age limit, a fresh token, blocked and paced routes left
        out (or only the route `only`)."""
        return {
            "limit": limit,
            "lease_ms": self._policy.lease_ms,
            "max_age_ms": self._policy.max_age_ms,
            "token": new_token(),
            "exclude": self._route_filter(only),
        }

    def _claimed(self, rows: list[OutboxRow], slots: list[object]) -> list[_Delivery]:
        """Claimed rows become deliveries, each with a slot; spare slots are freed."""
        if rows:
            _crashpoints.reached("claim_after_commit")
        self._counts["claimed"] += len(rows)
        deliveries = [_Delivery(row, slot) for row, slot in zip(rows, slots, strict=False)]
        self._out.update(deliveries)
        for slot in slots[len(rows) :]:
            self._limiter.release_on_behalf_of(slot)
        return deliveries

    def _launch(self, deliveries: list[_Delivery]) -> None:
        assert self._tasks is not None
        deadline = trio.current_time() + self.config.ack_timeout
        for delivery in deliveries:
            self._start(delivery, self._tasks, deadline)

    # -- outcomes, written in batches

    async def _write_outcomes(self, completions: Sequence[Completion]) -> Applied:
        """The completer's write: record a batch of outcomes and, while rows
        may be due, claim as many as the batch frees slots for, in the same
        transaction (`_after_batch` hands the slots over)."""
        if self._stopping or not self._maybe_more_due:
            return await self.outbox.complete(completions)
        self._refresh_blocked()
        limit = min(len(completions), self._claim_size)
        applied, self._refill = await self.outbox.complete_and_claim(completions, **self._claim_terms(limit))
        self._maybe_more_due = len(self._refill) == limit
        return applied

    def _after_batch(self) -> None:
        """A batch is written and its callbacks have run: the slots it freed
        go to the rows claimed with it, the rest back to the limiter."""
        freed, self._freed = self._freed, []
        rows, self._refill = self._refill, []
        unheld, self._unheld = self._unheld, set()
        for gate in unheld:
            self._release_held(gate)
            if not gate.held and not self._stopping:
                # Its rows were left out of claims while it held some: look
                # again now, not at the next poll.
                self.wake()
        deliveries = self._claimed(rows, freed)
        if self._stopping:  # nothing leaves: straight back, attempts returned
            self._hand_back(deliveries)
        else:
            self._launch(deliveries)

    # -- one row

    def _start(self, delivery: _Delivery, tasks: trio.Nursery, deadline: float) -> None:
        """Route one claimed row and send it (or hold it, or settle it at once)."""
        row = delivery.row
        route = self.registry.resolve(row)
        if isinstance(route, NoBroker):
            quiet = self._throttle(("no broker", row.mesh))
            if quiet is not None:
                log.warning(
                    "no broker for mesh %s: row %s is dead%s", visible(str(row.mesh)), row.id, quieted(quiet)
                )
            self._settle(delivery, _lifecycle.on_no_broker(row), _Settled.RESULT, "mesh:" + str(row.mesh))
            return
        if isinstance(route, Unavailable):
            self._give_back(delivery, route)
            return
        problem = unsendable(row)
        if problem is not None:
            log.warning("row %s can never be sent: %s", row.id, problem)
            completion = _lifecycle.on_error(
                row, error=problem, permanent=True, now=self.outbox.clock(), policy=self._policy, jitter=0.0
            )
            self._settle(delivery, completion, _Settled.RESULT, route.name)
            return
        gate = self._gates.get((route.kind, route.key)) or self._gate(route)
        delivery.gate, delivery.route, delivery.route_name = gate, route, route.name
        now = deadline - self.config.ack_timeout  # when this batch was launched
        pacer = gate.pacer
        # The common case first, inline: an unpaced route past slow start.
        if not gate.held and (
            (pacer.rate is None and pacer.cap is None) or pacer.may_send(pacer.unanswered, now)
        ):
            self._send(delivery, tasks, deadline, now)
        elif gate.pacer.paced:  # claimed just before its route was paced: its turn comes unclaimed
            self._pace_back(delivery, gate, "route_paced")
        else:  # slow start: it goes as answers come back
            delivery.held_since = now
            gate.held.append(delivery)

    def _gate(self, route: Ready) -> _Gate:
        key = (route.kind, route.key)
        gate = self._gates.get(key)
        if gate is None:
            # Brokers limit a member, not a connection: routes of one member
            # (its mesh socket, its sessions) share one pacer.
            member = getattr(route.broker, "rate_limit_key", None) or ("route", key)
            pacer = self._pacers.get(member)
            if pacer is None:
                pacer = self._pacers[member] = RoutePacer(window=self.config.max_inflight)
            gate = self._gates[key] = _Gate(route.name, key, pacer)
        return gate

    def _send(self, delivery: _Delivery, tasks: trio.Nursery, deadline: float, now: float) -> None:
        """Hand a routed row to its broker. It counts against its route's
        pacing from here, whether it leaves now or from a task."""
        route, gate = delivery.route, delivery.gate
        assert route is not None and gate is not None
        delivery.sent_at, delivery.held_since = now, math.inf
        delivery.counted = True
        gate.pacer.unanswered += 1
        gate.pacer.took(now)
        message = outgoing_message(delivery.row)
        start_send = getattr(route.broker, "start_send", None)
        if start_send is None:  # a plain Broker: a task waits for its answer
            tasks.start_soon(self._send_in_task, delivery, route, message)
            return
        delivery.sent = True
        delivery.deadline = deadline
        try:
            delivery.handle = start_send(message, functools.partial(self._on_result, delivery))
        except BrokerUnavailable:  # closed since we resolved the route: nothing left
            self._unsent(delivery, gate)
            return
        self._count("sent", route.name)

    def _unsent(self, delivery: _Delivery, gate: _Gate) -> None:
        """The socket closed before the frame could leave: back it goes."""
        delivery.sent = False
        self._give_back(delivery, self.registry.unavailable_route(delivery.row))

    async def _send_in_task(self, delivery: _Delivery, route: Ready, message: OutgoingMessage) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # stopping already: nothing leaves
        gate = delivery.gate
        assert gate is not None
        if delivery not in self._out:  # handed back (stop(), or held too long) before this task ran
            return
        delivery.sent = True
        self._count("sent", route.name)
        result = _ACK_TIMEOUT
        try:
            with trio.move_on_after(self.config.ack_timeout):
                result = await route.broker.send(message)
        except BrokerUnavailable:  # nothing left: the socket closed under us
            self._unsent(delivery, gate)
            return
        except Exception as exc:  # a broker bug must not kill the worker
            log.exception("broker %s raised while sending %s", route.name, message.client_message_id)
            result = SendResult.no_answer(bounded(f"send_failed: {type(exc).__name__}: {exc}"))
        self._on_result(delivery, result)

    def _on_result(self, delivery: _Delivery, result: SendResult) -> None:
        """The broker answered (or the ack deadline passed): decide the row's fate."""
        if delivery not in self._out:
            return  # settled already (timed out, or handed back)
        _crashpoints.reached("ack_before_record")
        row, gate = delivery.row, delivery.gate
        assert gate is not None
        now = self.outbox.clock()
        if result.rate_limited:
            self._rate_limited(delivery, gate, result)
        else:
            gate.pacer.answered(trio.current_time(), accepted=result.ok)
            if result.ok:
                completion = _lifecycle.on_ack(row, broker_message_id=result.message_id or "", now=now)
                if result.duplicate:
                    self._count("duplicates", delivery.route_name)
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
            self._settle(delivery, completion, _Settled.RESULT, delivery.route_name)
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

    def _rate_limited(self, delivery: _Delivery, gate: _Gate, result: SendResult) -> None:
        """The broker refused the send for its rate: pace the route, give the row back."""
        text = result.error or "rate_limited"
        self._count("rate_limited", gate.name)
        was_paced = gate.pacer.paced
        if gate.pacer.refused(trio.current_time(), sent_at=delivery.sent_at, text=text):
            log.log(
                logging.INFO if was_paced else logging.WARNING,
                "route %s is rate limited by its broker (%s); pacing it at %.3g sends/s",
                visible(gate.name),
                bounded(text, 120),
                gate.pacer.rate,
            )
            for sibling in self._gates.values():  # slow start is over: they wait their turn unclaimed
                while sibling.pacer is gate.pacer and sibling.held:
                    self._pace_back(sibling.held.popleft(), sibling, "route_paced")
        self._pace_back(delivery, gate, text)

    def _pace_back(self, delivery: _Delivery, gate: _Gate, error: str) -> None:
        """Give a row back, attempt returned, until its paced route may send."""
        now = trio.current_time()
        retry_at = self.outbox.clock() + math.ceil((gate.pacer.next_send_at(now) - now) * 1000)
        completion = _lifecycle.on_rate_limited(
            delivery.row, error=error, now=self.outbox.clock(), retry_at=retry_at
        )
        self._settle(delivery, completion, _Settled.GIVEN_BACK, gate.name)

    def _release_held(self, gate: _Gate) -> None:
        """Send rows slow start held, as far as it now allows."""
        tasks = self._tasks
        if tasks is None or self._stopping:
            return
        now = trio.current_time()
        deadline = now + self.config.ack_timeout
        while gate.held and gate.pacer.may_send(gate.pacer.unanswered, now):
            delivery = gate.held.popleft()
            if delivery in self._out:
                self._send(delivery, tasks, deadline, now)

    def _give_back(self, delivery: _Delivery, route: Unavailable) -> None:
        self._block(route)
        completion = _lifecycle.on_route_unavailable(
            delivery.row, now=self.outbox.clock(), policy=self._policy
        )
        self._count("unavailable", route.name)
        self._settle(delivery, completion, _Settled.GIVEN_BACK, route.name)

    def _hand_back_all(self) -> None:
        """Stopping: every row still out goes back to pending (sync: no checkpoint)."""
        self._hand_back(list(self._out))

    def _hand_back(self, deliveries: list[_Delivery]) -> None:
        now = self.outbox.clock()
        for delivery in deliveries:
            if delivery.handle is not None:
                delivery.handle.cancel()
            gate = delivery.gate
            if gate is not None and not delivery.sent and delivery in gate.held:
                gate.held.remove(delivery)
            completion = _lifecycle.on_released(
                delivery.row, sent=delivery.sent, now=now, policy=self._policy
            )
            kind = _Settled.RELEASED if delivery.sent else _Settled.GIVEN_BACK
            self._settle(delivery, completion, kind, delivery.route_name)

    async def _expire_overdue(self) -> None:
        """Fail pipelined sends whose ack is overdue, as transient `ack_timeout`.

        One sweep every quarter of the timeout (at most a second) instead of
        a cancel scope per send.
        """
        while True:
            await trio.sleep(min(1.0, self.config.ack_timeout / 4))
            now = trio.current_time()
            for delivery in [d for d in self._out if d.deadline <= now]:
                if delivery.handle is not None:
                    delivery.handle.cancel()
                self._on_result(delivery, _ACK_TIMEOUT)
            # Rows slow start held while their broker stopped answering: back
            # they go (attempt returned) before their lease can run out.
            stuck = [d for d in self._out if not d.sent and d.held_since + self.config.ack_timeout <= now]
            if stuck:
                self._hand_back(stuck)

    def _settle(self, delivery: _Delivery, completion: Completion, kind: _Settled, route_name: str) -> None:
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
        if not self._out and self._stop_requested:
            self._idle.set()
        self._completer.submit(
            completion, functools.partial(self._recorded, delivery, completion, kind, route_name)
        )

    def _recorded(
        self,
        delivery: _Delivery,
        completion: Completion,
        kind: _Settled,
        route_name: str,
        applied: bool | None,
    ) -> None:
        self._freed.append(delivery.slot)  # freed (or refilled) once the whole batch is through
        if applied is None:
            return  # the completer logged it; the lease will bring the row back
        if not applied:
            self._counts["stale"] += 1
            log.warning("row %s: lease was taken over; completion ignored", completion.row_id)
            return
        if kind is _Settled.RELEASED:
            return
        if kind is _Settled.GIVEN_BACK:
            self._counts["given_back"] += 1
        elif completion.status is Status.DONE:
            self._count("acked", route_name)
        elif completion.status is Status.DEAD:
            self._count("dead", route_name)
        else:
            self._count("retried", route_name)
        if completion.status is Status.PENDING:
            self.wake()  # the loop may be asleep past this row's new due time
        if self.on_completion is not None:
            self.on_completion(completion)

    def _count(self, field: _RouteField, route_name: str) -> None:
        if field in self._counts:
            self._counts[field] += 1
        per = self._per_route.get(route_name)
        if per is None:  # once per route, not once per row
            per = self._per_route[route_name] = dict.fromkeys(_ROUTE_FIELDS, 0)
        per[field] += 1
