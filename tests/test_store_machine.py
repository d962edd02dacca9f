"""A hypothesis state machine drives a real outbox (SQLite, then PostgreSQL)
against a simple model.

Two workers claim and complete rows while accepts (some in two ordering
lanes), clock jumps (forwards and backwards), lease expiry, max-age sweeps,
requeues, drops and route pauses interleave. The model decides what a claim
may take by asking the state machine (`_lifecycle.CLAIMABLE`, its lane and
pause terms judged over the model's rows), so the store's SQL and the flags
it keeps must agree with the pure rules. After every step the store must
agree with the model, and the invariants hold: each row in exactly one
state, attempts never above the cap, no client_message_id ever freed, a
stale lease changing nothing, no two rows of a lane in flight, and a lane's
rows delivered in accept order.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_drain import InvalidTransition, OutboxRow, OutcomeKind, SendRequest, Status
from trio_drain import _lifecycle as lc
from trio_drain._outbox import Outbox
from trio_drain._store._base import OutboxBackend
from trio_drain._store._postgres._backend import PostgresBackend
from trio_drain._store._sqlite._backend import SqliteBackend
from trio_drain._validate import prepare_row

from .helpers import FakeClock, TrioPortal
from .strategies import send_requests

POLICY = lc.RetryPolicy(
    max_attempts=3,
    backoff_base_ms=100,
    backoff_cap_ms=400,
    route_retry_ms=50,
    lease_ms=1000,
    max_age_ms=20_000,
)
RANK = {"now": 0, "next": 1, "low": 2}


@attrs.define
class ModelRow:
    id: str
    client_message_id: str
    fingerprint: bytes
    rank: int
    enqueued_at: int
    status: Status = Status.PENDING
    attempts: int = 0
    next_attempt_at: int = 0
    lease_token: str | None = None
    lease_expires_at: int | None = None
    last_error: str | None = None
    broker_message_id: str | None = None
    ordering_key: str | None = None
    mesh: str | None = None
    sender_session_pubkey: str | None = None


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="trio-drain-machine-")
        self.portal = TrioPortal().__enter__()
        self.clock = FakeClock()
        self.outbox = Outbox(self.portal.run(self.open_backend), clock=self.clock)
        self.model: dict[str, ModelRow] = {}
        self.by_client_id: dict[str, str] = {}
        self.held: dict[str, list[OutboxRow]] = {"A": [], "B": []}
        self.tokens = 0
        self.paused: set[str] = set()
        #: Per ordering lane, (enqueued_at, id) of its rows in the order they were delivered.
        self.delivered: dict[str, list[tuple[int, str]]] = {}

    async def open_backend(self) -> OutboxBackend:
        return await SqliteBackend.open(Path(self.folder) / "outbox.db", durability="normal")

    def teardown(self) -> None:
        self.portal.run(self.outbox.aclose)
        self.portal.__exit__(None, None, None)
        shutil.rmtree(self.folder, ignore_errors=True)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def go() -> Any:
            return await fn(*args, **kwargs)

        return self.portal.run(go)

    def enqueued_at(self, row_id: str, key: str | None) -> int:
        """When the new row `row_id` was enqueued: now, or, in a lane, now or
        the first millisecond that puts it after every row of its lane,
        whatever their status (the clock here steps back; accept order must
        hold). SQLite may keep now when the row's id sorts after a row of
        the same millisecond, PostgreSQL moves on a millisecond: the store's
        time is checked against those bounds and taken."""
        now = self.clock.now
        if key is None:
            return now
        stored = self.call(self.outbox.get, row_id)
        assert stored is not None
        lane = [(m.enqueued_at, m.id) for m in self.model.values() if m.ordering_key == key]
        last = max(lane, default=None)
        if last is not None:
            assert (stored.enqueued_at, row_id) > last, "a row joined its lane before its end"
        assert now <= stored.enqueued_at <= max(now, last[0] + 1 if last else now)
        return int(stored.enqueued_at)

    def world(self) -> lc.Table:
        return lc.Table(list(self.model.values()), paused=frozenset(self.paused))

    # -- rules

    @rule(request=send_requests())
    def accept(self, request: SendRequest) -> None:
        outcome = self.call(self.outbox.accept, request)
        fingerprint = prepare_row(request, now=0).request_fingerprint
        existing_id = self.by_client_id.get(outcome.client_message_id)
        if existing_id is None:
            assert outcome.inserted and outcome.kind is OutcomeKind.ACCEPTED_PENDING
            assert outcome.row_id is not None
            self.model[outcome.row_id] = ModelRow(
                id=outcome.row_id,
                client_message_id=outcome.client_message_id,
                fingerprint=fingerprint,
                rank=RANK[request.priority],
                enqueued_at=self.enqueued_at(outcome.row_id, request.ordering_key),
                next_attempt_at=self.clock.now,
                ordering_key=request.ordering_key,
                mesh=request.mesh,
            )
            self.by_client_id[outcome.client_message_id] = outcome.row_id
        else:
            row = self.model[existing_id]
            assert not outcome.inserted
            assert outcome.row_id == existing_id
            expected: tuple[OutcomeKind, str | None]
            if row.fingerprint != fingerprint:
                expected = (OutcomeKind.CONFLICT, f"outbox_{row.status.value}_fingerprint_mismatch")
            else:
                expected = {
                    Status.PENDING: (OutcomeKind.ACCEPTED_PENDING, None),
                    Status.INFLIGHT: (OutcomeKind.ACCEPTED_INFLIGHT, None),
                    Status.DONE: (OutcomeKind.ACCEPTED_DONE, None),
                    Status.DEAD: (OutcomeKind.CONFLICT, "outbox_dead_fingerprint_match"),
                    Status.ABORTED: (OutcomeKind.CONFLICT, "outbox_aborted_fingerprint_match"),
                }[row.status]
            assert (outcome.kind, outcome.reason) == expected
        self.clock.advance(1)

    @rule(worker=st.sampled_from("AB"), limit=st.integers(1, 4))
    def claim(self, worker: str, limit: int) -> None:
        self.tokens += 1
        token = f"{worker}{self.tokens}"
        rows = self.call(
            self.outbox.claim,
            limit=limit,
            lease_ms=POLICY.lease_ms,
            max_age_ms=POLICY.max_age_ms,
            token=token,
        )
        now = self.clock.now
        # The model asks the state machine; the store's SQL must agree with it.
        world = self.world()
        eligible = {
            r.id: r
            for r in self.model.values()
            if lc.holds(lc.CLAIMABLE, r, now=now, policy=POLICY, world=world)
        }
        assert len(rows) == min(limit, len(eligible))
        claimed_keys = []
        for row in rows:
            assert row.id in eligible, "claimed a row that was not claimable"
            claimed_keys.append((eligible[row.id].rank, eligible[row.id].enqueued_at))
        unclaimed = [(r.rank, r.enqueued_at) for i, r in eligible.items() if i not in {x.id for x in rows}]
        if claimed_keys and unclaimed:
            assert max(claimed_keys) <= min(unclaimed), "claim skipped a row that comes first"
        for row in rows:
            m = self.model[row.id]
            m.status, m.attempts, m.lease_token = Status.INFLIGHT, m.attempts + 1, token
            m.lease_expires_at = now + POLICY.lease_ms
            assert row.attempts == m.attempts
        self.held[worker].extend(rows)

    @precondition(lambda self: self.held["A"] or self.held["B"])
    @rule(
        worker=st.sampled_from("AB"),
        index=st.integers(0, 50),
        event=st.sampled_from(
            ["ack", "transient", "permanent", "unavailable", "no_broker", "released_unsent", "released_sent"]
        ),
    )
    def complete(self, worker: str, index: int, event: str) -> None:
        held = self.held[worker]
        if not held:
            return
        row = held.pop(index % len(held))
        now = self.clock.now
        completion = {
            "ack": lambda: lc.on_ack(row, broker_message_id="b", now=now),
            "transient": lambda: lc.on_error(
                row, error="e", permanent=False, now=now, policy=POLICY, jitter=0.5
            ),
            "permanent": lambda: lc.on_error(
                row, error="e", permanent=True, now=now, policy=POLICY, jitter=0.5
            ),
            "unavailable": lambda: lc.on_route_unavailable(row, now=now, policy=POLICY),
            "no_broker": lambda: lc.on_no_broker(row),
            "released_unsent": lambda: lc.on_released(row, sent=False, now=now, policy=POLICY),
            "released_sent": lambda: lc.on_released(row, sent=True, now=now, policy=POLICY),
        }[event]()
        (applied,) = self.call(self.outbox.complete, [completion])
        m = self.model[row.id]
        fresh = m.status is Status.INFLIGHT and m.lease_token == row.lease_token
        assert applied == fresh, "a stale lease changed a row, or a live one was refused"
        if applied:
            m.status, m.attempts, m.next_attempt_at = (
                completion.status,
                completion.attempts,
                completion.next_attempt_at,
            )
            m.last_error, m.broker_message_id = completion.last_error, completion.broker_message_id
            m.lease_token = m.lease_expires_at = None
            if m.status is Status.DONE and m.ordering_key is not None:
                self.delivered.setdefault(m.ordering_key, []).append((m.enqueued_at, m.id))

    @rule(ms=st.sampled_from([1, 60, 400, 999, 1000, 5000, 30_000, -500]))
    def clock_jumps(self, ms: int) -> None:
        self.clock.advance(ms)

    @precondition(lambda self: self.held["A"] or self.held["B"])
    @rule()
    def leases_run_out(self) -> None:
        """The quickest way to a stale lease: let held leases expire, recover them."""
        self.clock.advance(POLICY.lease_ms)
        self.recover_leases()

    @rule()
    def recover_leases(self) -> None:
        moved = self.call(self.outbox.recover_expired_leases, max_attempts=POLICY.max_attempts)
        now = self.clock.now
        expected = 0
        for m in self.model.values():
            if lc.holds(lc.LEASE_RAN_OUT, m, now=now, policy=POLICY):
                expected += 1
                m.status, m.last_error = lc.on_lease_expired(
                    unknown_fate=POLICY.unknown_fate,
                    at_cap=lc.holds(lc.AT_ATTEMPT_CAP, m, now=now, policy=POLICY),
                )
                if m.status is Status.PENDING:
                    m.next_attempt_at = now
                m.lease_token = m.lease_expires_at = None
            elif lc.holds(lc.LANE_HOLD_RAN_OUT, m, now=now, policy=POLICY):
                m.lease_expires_at = None
        assert moved == expected

    @rule()
    def expire_stale(self) -> None:
        moved = self.call(self.outbox.expire_stale, max_age_ms=POLICY.max_age_ms)
        now = self.clock.now
        expected = [m for m in self.model.values() if lc.holds(lc.PAST_MAX_AGE, m, now=now, policy=POLICY)]
        for m in expected:
            m.status, m.last_error = Status.DEAD, lc.EXPIRED
        assert moved == len(expected)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), action=st.sampled_from(["requeue", "drop"]))
    def operator(self, data: st.DataObject, action: str) -> None:
        row_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[row_id]
        allowed = lc.REQUEUEABLE if action == "requeue" else lc.DROPPABLE
        try:
            result = self.call(getattr(self.outbox, action), row_id)
        except InvalidTransition:
            assert m.status not in allowed
            return
        assert m.status in allowed
        # A row aborted in flight in a lane holds it until its lease runs out.
        held = m.status is Status.INFLIGHT and m.ordering_key is not None
        m.status, m.lease_token = Status.ABORTED, None
        m.lease_expires_at = m.lease_expires_at if held else None
        if action == "requeue":
            self.model[result.id] = ModelRow(
                id=result.id,
                client_message_id=result.client_message_id,
                fingerprint=m.fingerprint,
                rank=m.rank,
                enqueued_at=self.enqueued_at(result.id, m.ordering_key),  # the end of its lane
                next_attempt_at=self.clock.now,
                ordering_key=m.ordering_key,
                mesh=m.mesh,
            )
            self.by_client_id[result.client_message_id] = result.id

    @rule(mesh=st.sampled_from(["alpha", "beta"]), pause=st.booleans())
    def pause_or_resume(self, mesh: str, pause: bool) -> None:
        route = f"mesh:{mesh}"
        if pause:
            changed = self.call(self.outbox.pause, mesh=mesh, by="tester")
            assert changed == (route not in self.paused)
            self.paused.add(route)
        else:
            changed = self.call(self.outbox.resume, mesh=mesh)
            assert changed == (route in self.paused)
            self.paused.discard(route)
        assert self.call(self.outbox.paused) == frozenset(self.paused)

    # -- invariants

    @invariant()
    def a_lane_has_at_most_one_row_in_flight_and_delivers_in_accept_order(self) -> None:
        in_flight: dict[str, int] = {}
        for m in self.model.values():
            if m.ordering_key is not None and m.status is Status.INFLIGHT:
                in_flight[m.ordering_key] = in_flight.get(m.ordering_key, 0) + 1
        assert all(n == 1 for n in in_flight.values()), in_flight
        for key, order in self.delivered.items():
            assert order == sorted(order), key

    @invariant()
    def store_matches_model(self) -> None:
        rows = self.call(self.outbox.list, limit=10_000)
        assert len(rows) == len(self.model), "a row appeared or vanished"
        for row in rows:
            m = self.model[row.id]
            assert (row.status, row.attempts, row.lease_token) == (m.status, m.attempts, m.lease_token)
            # What the outcome wrote: when it is due again, why, and the broker's id.
            assert (row.next_attempt_at, row.last_error, row.broker_message_id) == (
                m.next_attempt_at,
                m.last_error,
                m.broker_message_id,
            ), row.id
            assert row.client_message_id == m.client_message_id
            assert row.attempts <= POLICY.max_attempts
        # No client_message_id is ever freed, and each names one row.
        assert {r.client_message_id for r in rows} == set(self.by_client_id)

    @invariant()
    def counts_partition_the_rows(self) -> None:
        counts = self.call(self.outbox.counts)
        assert set(counts) == {s.value for s in Status}
        assert sum(counts.values()) == len(self.model)
        for status in Status:
            assert counts[status.value] == sum(m.status is status for m in self.model.values())


#: Each machine, on each back end, runs under these.
MACHINE_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
OutboxMachine.TestCase.settings = MACHINE_SETTINGS
TestOutboxMachine = OutboxMachine.TestCase


class PostgresOutboxMachine(OutboxMachine):
    """The same machine over the PostgreSQL back end, a fresh database each run."""

    new_database: Callable[[], str] | None = None  # set by the fixture below

    async def open_backend(self) -> OutboxBackend:
        assert self.new_database is not None
        url = await trio.to_thread.run_sync(self.new_database)
        backend = await PostgresBackend.open(url, durability="normal")
        # PostgreSQL judges leases, due times and max_age by the server's
        # clock: let the machine's fake clock stand in for it.
        backend.server_clock = self.clock
        return backend


PostgresOutboxMachine.TestCase.settings = MACHINE_SETTINGS
TestPostgresOutboxMachine = PostgresOutboxMachine.TestCase


@pytest.fixture(autouse=True)
def _postgres_for_the_machine(request: pytest.FixtureRequest) -> None:
    if request.cls is TestPostgresOutboxMachine:
        PostgresOutboxMachine.new_database = request.getfixturevalue("pg_server").create_database
