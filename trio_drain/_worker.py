"""The drain worker: claims due rows and delivers them, many at a time.

One loop task claims rows, as many as there are free send slots, and starts
one delivery task per row in the worker's nursery. Send slots are tokens of
a `trio.CapacityLimiter` (`max_inflight`) acquired by the loop on each
delivery's behalf, so no row is claimed that cannot be sent at once. When
nothing is due, the loop sleeps until the next row is due, a wakeup arrives
on its memory channel (an accept, a broker connection opening), or
`poll_interval` passes (the backstop for rows written by other processes).

Rows whose route is down are not claimed at all until the route is back, so
an outage costs neither CPU nor attempts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Literal

import attrs
import trio

from . import _crashpoints, _lifecycle
from ._completer import BatchCompleter
from ._config import DrainConfig
from ._errors import BrokerUnavailable, StoreError, TrioDrainError
from ._ids import new_token
from ._lifecycle import Completion
from ._model import OutboxRow, Status
from ._outbox import Outbox
from ._routing import (
    BrokerRegistry,
    NoBroker,
    OutgoingMessage,
    Ready,
    SendResult,
    Unavailable,
    outgoing_message,
)
from ._store._base import RouteFilter

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
        given_back: claims returned with their attempt (route down, stopping).
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
    stale: int
    in_flight: int
    blocked_routes: tuple[str, ...]
    per_route: dict[str, RouteStatistics]


_RouteField = Literal["sent", "acked", "duplicates", "retried", "dead", "unavailable"]
_ROUTE_FIELDS = tuple(a.name for a in attrs.fields(RouteStatistics))
# The worker-wide counters: every int field of WorkerStatistics but the live ones.
_WORKER_COUNTERS = tuple(
    a.name for a in attrs.fields(WorkerStatistics) if a.type in (int, "int") and a.name != "in_flight"
)


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
        self._completer = BatchCompleter(outbox, in_flight=lambda: self._limiter.borrowed_tokens)
        # Blocked routes: (kind, key) as understood by BrokerRegistry.
        self._blocked: dict[tuple[str, str | None], str] = {}
        self._running = False
        self._counts: dict[str, int] = dict.fromkeys(_WORKER_COUNTERS, 0)
        self._per_route: dict[str, dict[str, int]] = {}
        #: Called with each row that reached a final state or was rescheduled;
        #: used by the CLI for progress. Must not block.
        self.on_completion: Callable[[Completion], None] | None = None

    # -- public

    def wake(self) -> None:
        """Look at the outbox now. Never blocks; many wakes coalesce into one."""
        try:
            self._wake_send.send_nowait(None)
        except trio.WouldBlock:
            pass

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of the worker's counters."""
        return WorkerStatistics(
            **self._counts,
            in_flight=self._limiter.borrowed_tokens,
            blocked_routes=tuple(sorted(self._blocked.values())),
            per_route={name: RouteStatistics(**c) for name, c in self._per_route.items()},
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain until cancelled. See the class docstring."""
        if self._running:
            raise TrioDrainError("this DrainWorker is already running")
        self._running = True
        self.outbox.add_listener(self.wake)
        self.registry.add_listener(self.wake)
        try:
            try:
                await self._maintain()
            except StoreError as exc:  # the loop keeps retrying; no need to die
                log.error("outbox unavailable at start (%s); will retry", exc)
            async with trio.open_nursery() as nursery:
                # The completer outlives every delivery: it stops only when
                # closed, after the deliveries nursery has exited and every
                # cancelled delivery has queued its row's hand-back.
                await nursery.start(self._completer.run)
                try:
                    async with trio.open_nursery() as deliveries:
                        deliveries.start_soon(self.outbox.watch, self.wake)
                        task_status.started()
                        await self._loop(deliveries)
                finally:
                    self._completer.close()
        finally:
            self.outbox.remove_listener(self.wake)
            self.registry.remove_listener(self.wake)
            self._running = False

    # -- the loop

    async def _loop(self, nursery: trio.Nursery) -> None:
        config = self.config
        next_maintenance = trio.current_time() + config.maintenance_interval
        failures = 0
        while True:
            slots = await self._take_slots()
            self._drain_wakes()
            self._refresh_blocked()
            try:
                if trio.current_time() >= next_maintenance:
                    await self._maintain()
                    next_maintenance = trio.current_time() + config.maintenance_interval
                # Shielded: a claim that commits must reach a delivery task,
                # which knows how to hand the row back if we are cancelled.
                with trio.CancelScope(shield=True):
                    rows = await self.outbox.claim(
                        limit=len(slots), lease_ms=self._policy.lease_ms,
                        max_age_ms=self._policy.max_age_ms, token=new_token(),
                        exclude=self._route_filter(),
                    )
            except StoreError as exc:
                for slot in slots:
                    self._limiter.release_on_behalf_of(slot)
                failures += 1
                delay = min(config.poll_interval * 2 ** min(failures, 6), 5.0)
                log.error("outbox unavailable (%s); retrying in %.1fs", exc, delay)
                await trio.sleep(delay)
                continue
            if failures:
                log.warning("outbox available again after %d failed attempt(s)", failures)
            failures = 0
            if rows:
                _crashpoints.reached("claim_after_commit")
            self._counts["claimed"] += len(rows)
            for row, slot in zip(rows, slots, strict=False):
                nursery.start_soon(self._deliver, row, slot)
            for slot in slots[len(rows):]:
                self._limiter.release_on_behalf_of(slot)
            if len(rows) == len(slots):
                continue  # there may be more due right now
            await self._sleep_until_due(next_maintenance)

    async def _take_slots(self) -> list[object]:
        """Wait for one free send slot, then take up to batch_size that are free."""
        first = object()
        await self._limiter.acquire_on_behalf_of(first)
        slots = [first]
        while len(slots) < self.config.batch_size:
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
        timeout = min(self.config.poll_interval, next_maintenance - trio.current_time())
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
        recovered = await self.outbox.recover_expired_leases(max_attempts=self._policy.max_attempts)
        expired = await self.outbox.expire_stale(max_age_ms=self._policy.max_age_ms)
        if recovered:
            log.warning("recovered %d row(s) whose lease expired", recovered)
        if expired:
            log.warning("%d pending row(s) passed max_age and went dead (expired)", expired)

    # -- blocked routes

    def _route_filter(self) -> RouteFilter:
        sessions = frozenset(k for kind, k in self._blocked if kind == "session" and k)
        meshes = frozenset(k for kind, k in self._blocked if kind == "mesh" and k)
        return RouteFilter(sessions, meshes, ("default", None) in self._blocked)

    def _refresh_blocked(self) -> None:
        for key in list(self._blocked):
            if not self.registry.route_unavailable(*key):
                name = self._blocked.pop(key)
                log.info("route %s is back; resuming its rows", name)

    def _block(self, route: Unavailable) -> None:
        key = (route.kind, route.key)
        if key not in self._blocked:
            log.info("route %s is not open; leaving its rows until it is", route.name)
            self._blocked[key] = route.name

    # -- one row

    async def _deliver(self, row: OutboxRow, slot: object) -> None:
        sent = submitted = False
        try:
            route = self.registry.resolve(row)
            if isinstance(route, NoBroker):
                log.warning("no broker for mesh %s: row %s is dead", row.mesh, row.id)
                submitted = True
                await self._finish(_lifecycle.on_no_broker(row), "mesh:" + str(row.mesh))
                return
            if isinstance(route, Unavailable):
                submitted = True
                await self._give_back(row, route)
                return
            message = outgoing_message(row)
            await trio.lowlevel.checkpoint_if_cancelled()  # stopping already: nothing left
            sent = True
            result = await self._send(route, message)
            if result is None:  # nothing left: the socket closed under us
                sent = False
                submitted = True
                await self._give_back(row, self.registry.unavailable_route(row))
                return
            _crashpoints.reached("ack_before_record")
            now = self.outbox.clock()
            if result.ok:
                completion = _lifecycle.on_ack(row, broker_message_id=result.message_id or "", now=now)
                if result.duplicate:
                    self._count("duplicates", route.name)
            else:
                completion = _lifecycle.on_error(
                    row, error=result.error or "unknown_error", permanent=result.permanent,
                    now=now, policy=self._policy, jitter=self._rng.random(),
                )
                if completion.status is Status.DEAD:
                    log.warning("row %s is dead: %s", row.id, completion.last_error)
            submitted = True
            await self._finish(completion, route.name)
        except trio.Cancelled:
            if not submitted:
                # Hand the row back; the completer writes it before it stops.
                self._completer.submit_nowait(_lifecycle.on_released(
                    row, sent=sent, now=self.outbox.clock(), policy=self._policy))
                if not sent:
                    self._counts["given_back"] += 1
            raise
        finally:
            self._limiter.release_on_behalf_of(slot)

    async def _send(self, route: Ready, message: OutgoingMessage) -> SendResult | None:
        self._count("sent", route.name)
        # A broker that bounds its own acks at least as tightly as we would
        # (WebSocketBroker does, with one sweeper per connection) is trusted
        # to answer in time: that saves a cancel scope per send on the hot
        # path. Any other broker gets our deadline.
        own = getattr(route.broker, "ack_timeout", None)
        if isinstance(own, (int, float)) and 0 < own <= self.config.ack_timeout:
            return await self._call_broker(route, message)
        with trio.move_on_after(self.config.ack_timeout):
            return await self._call_broker(route, message)
        return SendResult.failed("ack_timeout", permanent=False)

    async def _call_broker(self, route: Ready, message: OutgoingMessage) -> SendResult | None:
        try:
            return await route.broker.send(message)
        except BrokerUnavailable:
            return None
        except Exception as exc:  # a broker bug must not kill the worker
            log.exception("broker %s raised while sending %s", route.name, message.client_message_id)
            return SendResult.failed(f"send_failed: {type(exc).__name__}: {exc}", permanent=False)

    async def _give_back(self, row: OutboxRow, route: Unavailable) -> None:
        self._block(route)
        completion = _lifecycle.on_route_unavailable(row, now=self.outbox.clock(), policy=self._policy)
        self._count("unavailable", route.name)
        await self._finish(completion, route.name, given_back=True)

    async def _finish(self, completion: Completion, route_name: str, *, given_back: bool = False) -> None:
        applied = await self._completer.complete(completion)
        if applied is None:
            return  # the completer logged it; the lease will bring the row back
        if not applied:
            self._counts["stale"] += 1
            log.warning("row %s: lease was taken over; completion ignored", completion.row_id)
            return
        if given_back:
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
