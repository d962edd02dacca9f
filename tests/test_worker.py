"""The drain worker against an in-memory fake broker and a real outbox (each back end)."""

from __future__ import annotations

import functools
import statistics as stats
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from trio_drain import (
    BrokerUnavailable,
    DrainConfig,
    DrainWorker,
    Outbox,
    OutgoingMessage,
    SendResult,
    Status,
    TrioDrainError,
    open_outbox,
)

from .builders import req
from .helpers import QUICK_RETRIES, FakeBroker, Rig, wait_until

SESSION = "cd" * 32
FAST = attrs.evolve(QUICK_RETRIES, max_inflight=16, batch_size=16)


@pytest.fixture
async def rig(outbox_target: str) -> AsyncIterator[Rig]:
    """A FakeBroker for mesh "alpha", the outbox (each back end in turn) and a
    nursery; workers start with FAST."""
    async with open_outbox(outbox_target, durability="normal") as outbox, trio.open_nursery() as nursery:
        yield Rig(outbox, nursery, config=FAST)
        nursery.cancel_scope.cancel()


async def test_rows_are_delivered_many_at_a_time_and_end_done(rig: Rig) -> None:
    rig.broker.delay = 0.01
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(200)])
    worker = await rig.start()
    assert (await rig.settled(200))["done"] == 200
    assert 1 < rig.broker.max_concurrent <= FAST.max_inflight
    assert sorted(m.client_message_id for m in rig.broker.received) == sorted(f"m-{i}" for i in range(200))
    # The counters move once the worker hears its batch committed, a moment
    # after another connection can see the rows done.
    await wait_until(lambda: worker.statistics().in_flight == 0)
    s = worker.statistics()
    assert (s.claimed, s.sent, s.acked, s.dead, s.retried, s.in_flight) == (200, 200, 200, 0, 0, 0)
    assert s.per_route["mesh:alpha"].acked == 200
    row = await rig.outbox.get_by_client_id("m-7")
    assert row is not None and row.broker_message_id and row.delivered_at and row.lease_token is None


async def test_max_inflight_bounds_sends_outstanding(rig: Rig) -> None:
    rig.broker.delay = 0.02
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(40)])
    await rig.start(attrs.evolve(FAST, max_inflight=3))
    await rig.settled(40)
    assert rig.broker.max_concurrent == 3


async def test_transient_errors_are_retried_with_backoff_until_acked(rig: Rig) -> None:
    failures = {"m-1": 2}

    def script(m: OutgoingMessage) -> SendResult | None:
        if failures.get(m.client_message_id, 0) > 0:
            failures[m.client_message_id] -= 1
            return SendResult.failed("rate_limited", permanent=False)
        return None

    rig.broker.script = script
    await rig.outbox.accept(req("m-1"))
    worker = await rig.start()
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts, row.last_error) == (Status.DONE, 3, None)
    assert worker.statistics().retried == 2
    gaps = [b - a for a, b in zip(rig.broker.arrivals, rig.broker.arrivals[1:], strict=False)]
    assert all(g >= 0.004 for g in gaps), gaps  # at least half the 10 ms backoff step


async def test_an_overloaded_broker_narrows_the_window_and_loses_no_attempt(rig: Rig) -> None:
    refusals = {"count": 0}

    def script(m: OutgoingMessage) -> SendResult | None:
        if refusals["count"] < 5:
            refusals["count"] += 1
            return SendResult.throttled("overloaded: 3 sends waiting", code="overloaded")
        return None

    rig.broker.delay = 0.01
    rig.broker.script = script
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(40)])
    worker = await rig.start(attrs.evolve(FAST, max_inflight=16, route_retry=0.02))
    assert (await rig.settled(40))["done"] == 40
    await wait_until(lambda: worker.statistics().in_flight == 0)
    s = worker.statistics()
    assert s.window < 16  # cut, not paced
    assert s.rate_limited == 5 and s.per_route["mesh:alpha"].rate is None
    rows = await rig.outbox.list(limit=40)
    assert {(r.status, r.attempts) for r in rows} == {(Status.DONE, 1)}


async def test_a_fixed_window_stays_at_max_inflight(rig: Rig) -> None:
    rig.broker.delay = 0.01
    rig.broker.script = lambda m: (
        SendResult.throttled("overloaded", code="overloaded") if m.client_message_id == "m-0" else None
    )
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(20)])
    worker = await rig.start(attrs.evolve(FAST, adaptive=False, route_retry=0.02))
    await rig.settled(19)
    assert worker.statistics().window == FAST.max_inflight


async def test_permanent_errors_go_dead_with_the_brokers_error(rig: Rig) -> None:
    rig.broker.script = lambda m: SendResult.failed("payload_too_large", permanent=True)
    await rig.outbox.accept(req("m-1"))
    worker = await rig.start()
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts, row.last_error) == (
        Status.DEAD,
        1,
        "payload_too_large",
    )
    assert worker.statistics().dead == 1


async def test_transient_errors_at_the_attempt_cap_go_dead(rig: Rig) -> None:
    rig.broker.script = lambda m: SendResult.failed("busy", permanent=False)
    await rig.outbox.accept(req("m-1"))
    await rig.start(attrs.evolve(FAST, max_attempts=3))
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts, row.last_error) == (
        Status.DEAD,
        3,
        "max_attempts: busy",
    )
    assert len(rig.broker.received) == 3


async def test_a_missing_ack_is_a_transient_ack_timeout(rig: Rig) -> None:
    calls = []

    def script(m: OutgoingMessage) -> SendResult | None:
        calls.append(m)
        return None

    rig.broker.delay = 0.3
    rig.broker.script = script
    await rig.outbox.accept(req("m-1"))
    await rig.start(attrs.evolve(FAST, ack_timeout=0.1, max_attempts=2))
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.last_error) == (Status.DEAD, "max_attempts: ack_timeout")


async def test_a_broker_that_raises_is_a_transient_failure_not_a_crash(rig: Rig) -> None:
    seen = []

    def script(m: OutgoingMessage) -> SendResult | Exception | None:
        seen.append(m)
        return RuntimeError("bug in broker") if len(seen) == 1 else None

    rig.broker.script = script
    await rig.outbox.accept(req("m-1"))
    await rig.start()
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts) == (Status.DONE, 2)


async def test_rows_for_unknown_meshes_go_dead_and_null_mesh_uses_the_only_broker(rig: Rig) -> None:
    await rig.outbox.accept_many([req("gamma", mesh="gamma"), req("null", mesh=None)])
    await rig.start()
    await rig.settled(2)
    gamma = await rig.outbox.get_by_client_id("gamma")
    null = await rig.outbox.get_by_client_id("null")
    assert gamma is not None and (gamma.status, gamma.last_error) == (Status.DEAD, "no_broker_for_mesh:gamma")
    assert null is not None and null.status is Status.DONE
    rig.registry.set_mesh("beta", FakeBroker())
    await rig.outbox.accept(req("null-2", mesh=None))
    await rig.settled(3)
    null2 = await rig.outbox.get_by_client_id("null-2")
    assert null2 is not None and (null2.status, null2.last_error) == (Status.DEAD, "no_broker_for_mesh:null")


async def test_session_rows_wait_for_their_session_socket_and_never_use_the_mesh(rig: Rig) -> None:
    session = FakeBroker(is_open=False)
    rig.registry.set_session(SESSION, session)
    await rig.outbox.accept_many([req("s-1", sender_session_pubkey=SESSION), req("plain")])
    worker = await rig.start()
    await rig.settled(1)  # the plain row
    await trio.sleep(0.3)
    row = await rig.outbox.get_by_client_id("s-1")
    assert row is not None and (row.status, row.attempts) == (Status.PENDING, 0)
    assert [m.client_message_id for m in rig.broker.received] == ["plain"]
    assert worker.statistics().blocked_routes == (f"session:{SESSION[:12]}",)
    session.set_open(True)
    await rig.settled(2, seconds=1.0)
    assert [m.client_message_id for m in session.received] == ["s-1"]


async def test_an_outage_burns_no_attempts_and_does_not_spin(rig: Rig) -> None:
    rig.broker.set_open(False)
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(300)])
    worker = await rig.start()
    await trio.sleep(0.5)
    s = worker.statistics()
    # The first look at the route finds it closed; after that its rows are
    # left alone, so a handful of claims at most, not one per poll per row.
    assert s.claimed <= FAST.batch_size
    assert (await rig.outbox.counts())["pending"] == 300
    assert all(r.attempts == 0 for r in await rig.outbox.list(limit=300))
    started = trio.current_time()
    rig.broker.set_open(True)
    await rig.settled(300, seconds=5.0)
    assert trio.current_time() - started < 1.0
    assert worker.statistics().sent == 300


async def test_a_socket_closing_before_the_send_gives_the_row_back(rig: Rig) -> None:
    from trio_drain import BrokerUnavailable

    calls = []

    def script(m: OutgoingMessage) -> SendResult | Exception | None:
        calls.append(m)
        return BrokerUnavailable("closed under us") if len(calls) == 1 else None

    rig.broker.script = script
    await rig.outbox.accept(req("m-1"))
    worker = await rig.start()
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts) == (Status.DONE, 1)
    assert worker.statistics().given_back == 1


async def test_cancelling_mid_send_hands_every_row_back_to_pending(rig: Rig) -> None:
    rig.broker.delay = 10.0  # the acks never come before we cancel
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(10)])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            worker = DrainWorker(rig.outbox, rig.registry, FAST)
            await nursery.start(worker.run)
            await wait_until(lambda: len(rig.broker.received) == 10)
            scope.cancel()
    rows = await rig.outbox.list(limit=10)
    assert {r.status for r in rows} == {Status.PENDING}
    # They left, so the attempt stands; the broker's dedupe absorbs the resend.
    assert {(r.attempts, r.last_error, r.lease_token) for r in rows} == {(1, "worker_stopped", None)}


async def test_rows_claimed_but_not_yet_sent_when_cancelled_get_their_attempt_back(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(5)])
    worker = DrainWorker(rig.outbox, rig.registry, FAST)
    real_claim = rig.outbox.claim

    async with trio.open_nursery() as nursery:

        async def claim_then_cancel(**kw: Any) -> Any:
            rows = await real_claim(**kw)
            nursery.cancel_scope.cancel()  # stop arrives between claim and send
            return rows

        rig.outbox.claim = claim_then_cancel  # type: ignore[method-assign]
        nursery.start_soon(worker.run)
    rig.outbox.claim = real_claim  # type: ignore[method-assign]
    rows = await rig.outbox.list(limit=10)
    assert rig.broker.received == []
    assert {(r.status, r.attempts) for r in rows} == {(Status.PENDING, 0)}
    assert worker.statistics().given_back == 5


async def test_expired_leases_are_recovered_when_the_worker_starts(rig: Rig) -> None:
    await rig.outbox.accept(req("m-1"))
    # A previous worker claimed it and died; its 1 ms lease has run out.
    await rig.outbox.claim(limit=1, lease_ms=1, max_age_ms=10**9, token="dead-worker")
    await trio.sleep(0.01)
    await rig.start()
    await rig.settled(1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts) == (Status.DONE, 2)


async def test_the_worker_sleeps_until_the_next_row_is_due_not_a_poll_interval(rig: Rig) -> None:
    first: list[OutgoingMessage] = []

    def script(m: OutgoingMessage) -> SendResult | None:
        if not first:
            first.append(m)
            return SendResult.failed("later", permanent=False)
        return None

    rig.broker.script = script
    await rig.outbox.accept(req("m-1"))
    await rig.start(attrs.evolve(FAST, poll_interval=30.0, backoff_base=0.2, backoff_cap=0.2))
    await rig.settled(1, seconds=2.0)
    gap = rig.broker.arrivals[1] - rig.broker.arrivals[0]
    assert 0.1 <= gap < 1.0


async def test_rows_from_another_process_are_found_by_the_poll_backstop(rig: Rig, outbox_target: str) -> None:
    await rig.start(attrs.evolve(FAST, poll_interval=0.1))
    async with open_outbox(outbox_target) as other:  # another connection: no wakeup reaches the worker
        await other.accept(req("m-1"))
    await rig.settled(1, seconds=2.0)


async def test_an_accept_wakes_an_idle_worker_at_once(rig: Rig) -> None:
    await rig.start(attrs.evolve(FAST, poll_interval=30.0))
    await trio.sleep(0.05)  # let it go idle
    latencies = []
    for i in range(30):
        t0 = trio.current_time()
        await rig.outbox.accept(req(f"m-{i}"))
        await wait_until(functools.partial(_arrived, rig.broker, i + 1))
        latencies.append(rig.broker.arrivals[-1] - t0)
    # Loose bounds: this proves the wakeup path; the benchmark measures speed.
    assert stats.median(latencies) < 0.1


async def test_wake_never_blocks_and_coalesces(rig: Rig) -> None:
    worker = DrainWorker(
        rig.outbox, rig.registry, attrs.evolve(FAST, poll_interval=60.0, maintenance_interval=60.0)
    )
    claims = 0
    original = rig.outbox.claim

    async def counting_claim(**kw: Any) -> Any:
        nonlocal claims
        claims += 1
        return await original(**kw)

    rig.outbox.claim = counting_claim  # type: ignore[method-assign]
    await rig.nursery.start(worker.run)
    await wait_until(lambda: claims >= 1)  # the first look, at start
    await trio.sleep(0.1)
    settled = claims
    for _ in range(1000):  # a plain function: it cannot block
        worker.wake()
    await trio.sleep(0.2)
    # A thousand wakes while idle are one look at the outbox, not a thousand.
    assert claims == settled + 1, (settled, claims)


async def test_a_worker_cannot_run_twice_at_once(rig: Rig) -> None:
    worker = await rig.start()
    with pytest.raises(TrioDrainError, match="already running"):
        await worker.run()


async def test_statistics_are_a_frozen_snapshot(rig: Rig) -> None:
    worker = await rig.start()
    snapshot = worker.statistics()
    await rig.outbox.accept(req("m-1"))
    await rig.settled(1)
    assert snapshot.acked == 0 and worker.statistics().acked == 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.acked = 5  # type: ignore[misc]


async def test_the_per_route_table_of_a_snapshot_is_read_only_and_never_changes(rig: Rig) -> None:
    worker = await rig.start()
    await rig.outbox.accept(req("m-1"))
    await rig.settled(1)
    routes = worker.statistics().per_route
    alpha = routes["mesh:alpha"]
    with pytest.raises(TypeError):
        routes["mesh:alpha"] = alpha  # type: ignore[index]
    with pytest.raises(TypeError):
        del routes["mesh:alpha"]  # type: ignore[attr-defined]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        alpha.acked = 5  # type: ignore[misc]
    await rig.outbox.accept(req("m-2"))
    await rig.outbox.accept(req("m-3", mesh="nowhere"))  # a second route: dead, no broker
    await wait_until(lambda: worker.statistics().acked + worker.statistics().dead == 3)
    assert {name: r.acked for name, r in worker.statistics().per_route.items()} == {
        "mesh:alpha": 2,
        "mesh:nowhere": 0,
    }
    assert list(routes) == ["mesh:alpha"] and routes["mesh:alpha"].acked == 1


def _arrived(broker: FakeBroker, n: int) -> bool:
    return len(broker.arrivals) >= n


async def test_a_broker_promising_a_longer_ack_timeout_still_gets_the_workers(rig: Rig) -> None:
    rig.broker.ack_timeout = 30.0
    rig.broker.delay = 5.0
    await rig.outbox.accept(req("m-1"))
    await rig.start(attrs.evolve(FAST, ack_timeout=0.1, max_attempts=1))
    await rig.settled(1, seconds=3.0)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and row.last_error == "max_attempts: ack_timeout"


# -- a pipelined broker (start_send and a callback, no task per row) ---------------------------


class PipelinedFake:
    """Takes sends with `start_send` and answers only when the test says so."""

    def __init__(self) -> None:
        self.open = True
        self.waiting: dict[str, Any] = {}  # client_message_id -> on_result
        self.cancelled: list[str] = []

    def is_open(self) -> bool:
        return self.open

    async def send(self, message: OutgoingMessage) -> SendResult:
        raise AssertionError("a pipelined broker is never sent to with send()")

    def start_send(self, message: OutgoingMessage, on_result: Any) -> Any:
        if not self.open:
            raise BrokerUnavailable("closed")
        cid = message.client_message_id
        self.waiting[cid] = on_result
        fake = self

        class Handle:
            def cancel(self) -> None:
                fake.cancelled.append(cid)
                fake.waiting.pop(cid, None)

        return Handle()

    def answer_all(self, result: SendResult) -> None:
        waiting, self.waiting = self.waiting, {}
        for on_result in waiting.values():
            on_result(result)


async def pipelined_rig(
    outbox: Outbox, nursery: trio.Nursery, config: DrainConfig = FAST
) -> tuple[PipelinedFake, DrainWorker]:
    broker = PipelinedFake()
    return broker, await Rig(outbox, nursery, broker).start(config)


async def test_a_pipelined_broker_gets_many_sends_at_once_and_its_callbacks_finish_them(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(10)])
    broker, worker = await pipelined_rig(rig.outbox, rig.nursery)
    await wait_until(lambda: len(broker.waiting) == 10)  # all out before any answer
    broker.answer_all(SendResult.acked("b-1"))
    assert (await rig.settled(10))["done"] == 10
    await wait_until(lambda: worker.statistics().in_flight == 0)
    assert (worker.statistics().sent, worker.statistics().acked) == (10, 10)


async def test_a_pipelined_ack_after_the_deadline_changes_nothing(rig: Rig) -> None:
    await rig.outbox.accept(req("m-1"))
    broker, worker = await pipelined_rig(rig.outbox, rig.nursery, attrs.evolve(FAST, ack_timeout=0.1))
    await wait_until(lambda: "m-1" in broker.waiting)
    late = broker.waiting["m-1"]
    await wait_until(lambda: broker.cancelled == ["m-1"])  # the sweep timed it out and let go
    late(SendResult.acked("too-late"))  # a broker that answers anyway
    await wait_until(lambda: worker.statistics().retried == 1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and row.broker_message_id is None and row.last_error == "ack_timeout"


async def test_stopping_hands_back_pipelined_sends_and_cancels_their_handles(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(5)])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            broker, _ = await pipelined_rig(rig.outbox, nursery)
            await wait_until(lambda: len(broker.waiting) == 5)
            scope.cancel()
    assert sorted(broker.cancelled) == [f"m-{i}" for i in range(5)]
    rows = await rig.outbox.list(limit=10)
    assert {(r.status, r.attempts, r.last_error) for r in rows} == {(Status.PENDING, 1, "worker_stopped")}


async def test_a_pipelined_broker_closing_before_the_send_gives_the_attempt_back(rig: Rig) -> None:
    broker, worker = await pipelined_rig(rig.outbox, rig.nursery)
    looks_open = iter([True])  # open when the row is routed, closed by the time it is sent
    broker.is_open = lambda: next(looks_open, False)  # type: ignore[method-assign]
    broker.open = False
    await rig.outbox.accept(req("m-1"))
    await wait_until(lambda: worker.statistics().given_back >= 1)
    row = await rig.outbox.get_by_client_id("m-1")
    assert row is not None and (row.status, row.attempts, row.last_error) == (
        Status.PENDING,
        0,
        "route_unavailable",
    )


# -- outcomes written together with the next claim -----------------------------------


async def test_writing_outcomes_claims_rows_for_the_slots_they_free(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i:02}") for i in range(40)])
    limits: list[tuple[str, int]] = []
    claim, complete_and_claim = rig.outbox.claim, rig.outbox.complete_and_claim

    async def spied_claim(**kw: Any) -> Any:
        rows = await claim(**kw)
        limits.append(("loop", kw["limit"]))
        return rows

    async def spied_complete_and_claim(completions: Any, **kw: Any) -> Any:
        applied, rows = await complete_and_claim(completions, **kw)
        limits.append(("refill", kw["limit"]))
        assert kw["limit"] <= len(completions)  # only slots this batch frees
        return applied, rows

    rig.outbox.claim = spied_claim  # type: ignore[method-assign]
    rig.outbox.complete_and_claim = spied_complete_and_claim  # type: ignore[method-assign]
    broker, worker = await pipelined_rig(rig.outbox, rig.nursery, attrs.evolve(FAST, max_inflight=8))

    async def answer_until_done() -> bool:
        broker.answer_all(SendResult.acked("b"))
        return (await rig.outbox.counts())["done"] == 40

    await wait_until(answer_until_done)
    rows = await rig.outbox.list(limit=100)
    assert {(r.status, r.attempts) for r in rows} == {(Status.DONE, 1)}
    assert max(limit for _, limit in limits) <= 4  # half the window per claim
    refills = sum(1 for kind, _ in limits if kind == "refill")
    assert refills >= 5, limits  # most rows went out from outcome writes, not the loop
    await wait_until(lambda: worker.statistics().in_flight == 0)
    assert worker.statistics().claimed == 40


async def test_rows_a_refill_claims_after_stopping_began_go_straight_back(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(6)])
    complete_and_claim = rig.outbox.complete_and_claim
    writing, gate = trio.Event(), trio.Event()

    async def held(completions: Any, **kw: Any) -> Any:
        writing.set()
        await gate.wait()
        return await complete_and_claim(completions, **kw)

    rig.outbox.complete_and_claim = held  # type: ignore[method-assign]
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            broker, worker = await pipelined_rig(rig.outbox, nursery, attrs.evolve(FAST, max_inflight=2))
            await wait_until(lambda: len(broker.waiting) == 2)  # a claim is half the window: two claims
            broker.answer_all(SendResult.acked("b"))
            await writing.wait()  # the outcome is being written, with a claim for its slot

            async def release_once_stopping() -> None:
                await wait_until(lambda: worker._stopping)
                gate.set()

            rig.nursery.start_soon(release_once_stopping)
            scope.cancel()
    # The row claimed with the outcome never went out: back with its attempt.
    assert broker.waiting == {} and broker.cancelled == []
    counts = await rig.outbox.counts()
    assert (counts["done"], counts["inflight"], counts["pending"]) == (2, 0, 4)
    rows = {r.client_message_id: r for r in await rig.outbox.list(limit=10)}
    assert rows["m-2"].attempts == 0 and rows["m-2"].status is Status.PENDING


# -- the batch completer on its own ------------------------------------------------------


async def test_the_completer_writes_a_burst_at_once_without_waiting_out_its_delay() -> None:
    from trio_drain._drain._completer import BatchCompleter

    writes: list[int] = []

    class CountingOutbox:
        async def complete(self, completions: Any) -> list[bool]:
            writes.append(len(completions))
            return [True] * len(completions)

    # A long delay, and more sends in flight than will report: only a quiet
    # scheduling pass can end the gathering.
    completer = BatchCompleter(CountingOutbox(), max_delay=5.0, in_flight=lambda: 100)  # type: ignore[arg-type]
    recorded: list[bool | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(completer.run)
        try:
            with trio.fail_after(1):
                for _ in range(10):
                    completer.submit(None, recorded.append)  # type: ignore[arg-type]
                await wait_until(lambda: len(recorded) == 10)
        finally:
            completer.close()  # its run ends only when closed
    assert writes == [10] and recorded == [True] * 10


# -- stopping gracefully, and what a stop must not leak ----------------------------------------


async def test_stop_claims_nothing_more_and_returns_once_the_rows_out_are_answered(rig: Rig) -> None:
    await rig.outbox.accept_many([req(f"m-{i}") for i in range(40)])
    broker = PipelinedFake()
    worker = Rig(rig.outbox, rig.nursery, broker).worker(attrs.evolve(FAST, max_inflight=16))
    finished = trio.Event()

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        await worker.run(task_status=task_status)
        finished.set()

    await rig.nursery.start(run)
    await wait_until(lambda: len(broker.waiting) == 16)
    worker.stop()
    await trio.sleep(0.2)
    assert not finished.is_set(), "sends are out: it waits for their answers"
    broker.answer_all(SendResult.acked("b"))
    with trio.fail_after(5):
        await finished.wait()
    counts = await rig.outbox.counts()
    assert (counts["done"], counts["pending"], counts["inflight"]) == (16, 24, 0), "no new claim after stop()"
    assert worker.statistics().in_flight == 0


async def test_cancelling_the_worker_during_maintenance_leaks_no_send_slot(rig: Rig) -> None:
    entered = trio.Event()

    async def stuck(**kw: Any) -> int:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    worker = DrainWorker(rig.outbox, rig.registry, attrs.evolve(FAST, maintenance_interval=0.05))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)  # its first maintenance is done
            rig.outbox.expire_stale = stuck  # type: ignore[method-assign]
            await entered.wait()  # the loop's: slots taken for the claim that follows
            assert worker.statistics().in_flight > 0
            scope.cancel()
    assert worker.statistics().in_flight == 0
