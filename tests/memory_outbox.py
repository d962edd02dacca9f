"""An outbox held in memory, and a broker with scripted latencies: the worker
under `autojump_clock`, with no thread and no socket (deterministic time).

`MemoryBackend` implements what the worker asks of a store (claim, complete,
complete_and_claim, the sweeps, counts) with no lanes and no paused routes;
it holds a backlog of rows made by `add`. `ScriptedBroker` is a pipelined
broker (`start_send` and a callback) whose answers come after a latency
that may change with time, behind a queue served at a given rate, with a
capacity past which it answers ``overloaded`` at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import attrs
import trio

from trio_drain import Outbox, OutgoingMessage, SendResult, Status
from trio_drain._lifecycle import Completion
from trio_drain._model import OutboxRow
from trio_drain._store._base import NO_FILTER, OutboxBackend, RouteFilter


def trio_ms() -> int:
    """Milliseconds of Trio's clock (the mock clock, under autojump)."""
    return int(trio.current_time() * 1000)


class MemoryBackend:
    """The worker's side of a store, in memory. Rows are due in the order added."""

    def __init__(self) -> None:
        self.rows: dict[str, OutboxRow] = {}
        self._due: list[tuple[int, int, str]] = []  # (next_attempt_at, seq, id) of pending rows
        self._seq = itertools.count()
        self.claims = 0

    def add(self, n: int, *, now: int, mesh: str = "alpha", prefix: str = "m") -> None:
        """`n` pending rows for `mesh`, due now."""
        for _ in range(n):
            i = next(self._seq)
            row = OutboxRow(
                id=f"{prefix}-{i:07d}",
                client_message_id=f"{prefix}-{i:07d}",
                request_fingerprint=b"\x00" * 32,
                payload=b"x",
                enqueued_at=now,
                attempts=0,
                next_attempt_at=now,
                status=Status.PENDING,
                mesh=mesh,
                target_spec="*",
                priority="next",
            )
            self.rows[row.id] = row
            heapq.heappush(self._due, (now, i, row.id))

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in Status), 0)
        for row in self.rows.values():
            counts[row.status.value] += 1
        return counts

    # -- what the worker calls

    async def claim(
        self,
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
        **_: Any,
    ) -> list[OutboxRow]:
        await trio.lowlevel.checkpoint()
        return self._claim(now, limit, lease_ms, token, exclude)

    def _claim(
        self, now: int, limit: int, lease_ms: int, token: str, exclude: RouteFilter
    ) -> list[OutboxRow]:
        self.claims += 1
        found: list[OutboxRow] = []
        aside: list[tuple[int, int, str]] = []
        while self._due and len(found) < limit and self._due[0][0] <= now:
            entry = heapq.heappop(self._due)
            row = self.rows[entry[2]]
            if row.status is not Status.PENDING or row.next_attempt_at != entry[0]:
                continue  # stale: the row moved on since
            if exclude and exclude.blocks(row):
                aside.append(entry)
                continue
            row = attrs.evolve(
                row,
                status=Status.INFLIGHT,
                attempts=row.attempts + 1,
                lease_token=token,
                lease_expires_at=now + lease_ms,
            )
            self.rows[row.id] = row
            found.append(row)
        for entry in aside:
            heapq.heappush(self._due, entry)
        return found

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        await trio.lowlevel.checkpoint()
        return self._complete(completions)

    def _complete(self, completions: Sequence[Completion]) -> list[bool]:
        applied = []
        for c in completions:
            row = self.rows[c.row_id]
            if row.status is not Status.INFLIGHT or row.lease_token != c.lease_token:
                applied.append(False)
                continue
            row = attrs.evolve(
                row,
                status=c.status,
                attempts=c.attempts,
                next_attempt_at=c.next_attempt_at,
                last_error=c.last_error,
                delivered_at=c.delivered_at,
                broker_message_id=c.broker_message_id,
                lease_token=None,
                lease_expires_at=None,
            )
            self.rows[row.id] = row
            if row.status is Status.PENDING:
                heapq.heappush(self._due, (row.next_attempt_at, next(self._seq), row.id))
            applied.append(True)
        return applied

    async def complete_and_claim(
        self,
        completions: Sequence[Completion],
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
        **_: Any,
    ) -> tuple[list[bool], list[OutboxRow]]:
        await trio.lowlevel.checkpoint()
        applied = self._complete(completions)
        return applied, self._claim(now, limit, lease_ms, token, exclude)

    async def recover_expired_leases(self, *, now: int, max_attempts: int, **_: Any) -> int:
        await trio.lowlevel.checkpoint()
        recovered = 0
        for row in list(self.rows.values()):
            if row.status is Status.INFLIGHT and (row.lease_expires_at or 0) <= now:
                row = attrs.evolve(
                    row, status=Status.PENDING, next_attempt_at=now, lease_token=None, lease_expires_at=None
                )
                self.rows[row.id] = row
                heapq.heappush(self._due, (now, next(self._seq), row.id))
                recovered += 1
        return recovered

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        await trio.lowlevel.checkpoint()
        return 0

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        await trio.lowlevel.checkpoint()
        due = [
            at
            for at, _, row_id in self._due
            if self.rows[row_id].status is Status.PENDING
            and self.rows[row_id].next_attempt_at == at
            and not (exclude and exclude.blocks(self.rows[row_id]))
        ]
        return min(due) if due else None

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def counts(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return self.status_counts()

    async def aclose(self) -> None:
        pass


def memory_outbox(backend: MemoryBackend) -> Outbox:
    """An `Outbox` over `backend`, on Trio's clock."""
    return Outbox(cast(OutboxBackend, backend), clock=trio_ms, description="memory")


@attrs.define(eq=False)
class _Handle:
    broker: ScriptedBroker
    key: int

    def cancel(self) -> None:
        self.broker.cancelled.add(self.key)


class ScriptedBroker:
    """A pipelined broker answering each send after `latency(now)` seconds,
    once a queue served at `service_rate` sends a second (None: at once)
    has reached it; with `capacity`, a send that finds that many waiting is
    answered ``overloaded`` at once. Run `run` in a nursery."""

    def __init__(
        self,
        *,
        latency: Callable[[float], float] | float = 0.01,
        service_rate: float | None = None,
        capacity: int | None = None,
    ) -> None:
        self.latency = latency if callable(latency) else (lambda now, d=float(latency): d)
        self.service_rate = service_rate
        self.capacity = capacity
        self.sent = 0
        self.acked = 0
        self.overloaded = 0
        self.waiting = 0
        self.max_waiting = 0
        self.cancelled: set[int] = set()
        self._due: list[tuple[float, int, Callable[[SendResult], None], SendResult, bool]] = []
        self._seq = itertools.count()
        self._server_free = -math.inf
        self._queued = trio.Event()

    def is_open(self) -> bool:
        return True

    async def send(self, message: OutgoingMessage) -> SendResult:
        raise AssertionError("a pipelined broker is sent to with start_send")

    def start_send(self, message: OutgoingMessage, on_result: Callable[[SendResult], None]) -> _Handle:
        now = trio.current_time()
        key = next(self._seq)
        self.sent += 1
        if self.capacity is not None and self.waiting >= self.capacity:
            self.overloaded += 1
            result = SendResult.throttled(
                f"overloaded: {self.capacity} sends waiting for their ack", code="overloaded"
            )
            heapq.heappush(self._due, (now, key, on_result, result, False))
        else:
            start = now
            if self.service_rate is not None:
                start = max(now, self._server_free) + 1 / self.service_rate
                self._server_free = start
            self.waiting += 1
            self.max_waiting = max(self.max_waiting, self.waiting)
            result = SendResult.acked(f"b-{key}")
            heapq.heappush(self._due, (start + self.latency(now), key, on_result, result, True))
        self._queued.set()
        return _Handle(self, key)

    async def run(self) -> None:
        """Answer sends as they fall due, until cancelled."""
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            while self._due:
                due = self._due[0][0]
                if due > trio.current_time():
                    with trio.move_on_at(due):
                        await self._queued.wait()
                    self._queued = trio.Event()
                    continue
                _, key, on_result, result, counted = heapq.heappop(self._due)
                if counted:
                    self.waiting -= 1
                    self.acked += 1
                if key not in self.cancelled:
                    on_result(result)
