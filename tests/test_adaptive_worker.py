"""The worker's adaptive window (SPEC sections 7 and 9), in deterministic time:
an outbox in memory and a broker with scripted latencies, queue and
capacity, under `autojump_clock` (no thread, no socket)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio
import trio.testing

from trio_drain import BrokerRegistry, DrainConfig, DrainWorker, Status

from .helpers import wait_until
from .memory_outbox import MemoryBackend, ScriptedBroker, memory_outbox, trio_ms

#: Quick retries and long timeouts: only the window is under test.
CONFIG = DrainConfig(
    max_inflight=512, poll_interval=0.05, backoff_base=0.01, backoff_cap=0.05, route_retry=0.05, lease=60.0
)


@attrs.define
class Run:
    """A worker draining a memory outbox through a scripted broker."""

    backend: MemoryBackend
    broker: ScriptedBroker
    worker: DrainWorker
    nursery: trio.Nursery
    #: (trio time, rows done, window), every `every` seconds.
    timeline: list[tuple[float, int, int]] = attrs.field(factory=list)

    def done(self) -> int:
        return self.worker.statistics().acked

    async def until_done(self, n: int, *, seconds: float = 600.0) -> float:
        """Wait until `n` rows are done; return the (virtual) seconds it took."""
        began = trio.current_time()
        await wait_until(lambda: self.done() >= n, seconds=seconds)
        return trio.current_time() - began

    def rate(self, since: float, until: float) -> float:
        """Rows done a second between two times of the timeline."""
        points = [(t, d) for t, d, _ in self.timeline if since <= t <= until]
        (t0, d0), (t1, d1) = points[0], points[-1]
        return (d1 - d0) / (t1 - t0)

    def windows(self, since: float, until: float) -> list[int]:
        return [w for t, _, w in self.timeline if since <= t <= until]


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def start(
    nursery: trio.Nursery,
    rows: int,
    broker: ScriptedBroker,
    config: DrainConfig = CONFIG,
    *,
    every: float = 0.05,
) -> Run:
    backend = MemoryBackend()
    backend.add(rows, now=trio_ms())
    registry = BrokerRegistry()
    registry.set_mesh("alpha", broker)
    worker = DrainWorker(memory_outbox(backend), registry, config)
    run = Run(backend, broker, worker, nursery)
    nursery.start_soon(broker.run)

    async def sample() -> None:
        while True:
            s = worker.statistics()
            run.timeline.append((trio.current_time(), s.acked, s.window))
            await trio.sleep(every)

    await nursery.start(worker.run)
    nursery.start_soon(sample)
    return run


async def test_against_a_far_broker_the_window_opens_to_max_inflight(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    run = await start(nursery, 30_000, ScriptedBroker(latency=0.05))
    took = await run.until_done(30_000)
    assert run.worker.statistics().window == CONFIG.max_inflight
    assert run.broker.max_waiting == CONFIG.max_inflight
    # Little's law: 512 sends per 50 ms round trip, less the first round trips.
    assert 30_000 / took >= 0.8 * CONFIG.max_inflight / 0.05


async def test_where_a_wider_window_only_queues_the_window_narrows_to_what_the_broker_serves(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # 2,000 sends a second, one after another, then 10 ms: past a window of
    # 20 every extra send only waits in the broker's queue.
    run = await start(nursery, 20_000, ScriptedBroker(latency=0.01, service_rate=2000))
    await run.until_done(20_000)
    end = run.timeline[-1][0]
    late = run.windows(end - 3, end)
    assert max(late) <= 64, late  # near the knee of 20, far from max_inflight
    assert min(late) >= 16, late
    assert run.rate(end - 3, end) >= 0.9 * 2000


async def test_against_a_brokers_capacity_the_window_settles_under_it_and_few_sends_fail(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    run = await start(nursery, 30_000, ScriptedBroker(latency=0.01, capacity=100))
    await run.until_done(30_000)
    end = run.timeline[-1][0]
    late = run.windows(end / 2, end)
    assert min(late) >= 70 and max(late) <= 110, late
    s = run.worker.statistics()
    assert s.rate_limited == run.broker.overloaded
    assert run.broker.overloaded / run.broker.sent < 0.05
    # An overload is not a failure: every row done at its first attempt, and
    # the route was never paced as if rate limited.
    assert {(r.status, r.attempts) for r in run.backend.rows.values()} == {(Status.DONE, 1)}
    assert s.per_route["mesh:alpha"].rate is None


async def test_a_fixed_window_holds_at_max_inflight_whatever_the_broker_answers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = attrs.evolve(CONFIG, adaptive=False)
    run = await start(nursery, 2_000, ScriptedBroker(latency=0.01, capacity=100), config)
    await run.until_done(2_000)
    assert set(run.windows(0, run.timeline[-1][0])) == {CONFIG.max_inflight}
    assert run.broker.overloaded > run.broker.acked  # most sends fail
    assert {(r.status, r.attempts) for r in run.backend.rows.values()} == {(Status.DONE, 1)}


async def test_the_seed_schedule_stays_one_send_at_a_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = DrainConfig.seed_schedule(poll_interval=0.05)
    assert (config.max_inflight, config.batch_size, config.adaptive) == (1, 32, False)
    run = await start(nursery, 300, ScriptedBroker(latency=0.001), config)
    await run.until_done(300)
    assert run.broker.max_waiting == 1
    assert set(run.windows(0, run.timeline[-1][0])) == {1}


def _latency_steps(start: float) -> Callable[[float], float]:
    def latency(now: float) -> float:
        return 0.04 if start + 3 <= now < start + 6 else 0.005

    return latency


async def test_the_rate_follows_the_brokers_latency_up_and_down_within_two_seconds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # 2,000 sends a second at most: a window of 10 at 5 ms, 80 at 40 ms.
    began = trio.current_time()
    broker = ScriptedBroker(latency=_latency_steps(began), service_rate=2000)
    run = await start(nursery, 20_000, broker)
    await trio.sleep(9.0)
    for step in (began + 3, began + 6):
        followed = [t for t, _, _ in run.timeline if step <= t and run.rate(t - 0.5, t) >= 0.85 * 2000]
        assert followed and followed[0] - step <= 2.0, (step - began, followed[:1])
    # At 40 ms the window opened well past its size at 5 ms.
    assert max(run.windows(began + 4, began + 6)) >= 80
    assert max(run.windows(began + 2, began + 3)) < 80


async def test_a_large_change_of_window_is_logged_and_small_ones_are_not(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_drain.worker")
    run = await start(nursery, 20_000, ScriptedBroker(latency=0.05))
    await run.until_done(20_000)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("send window")]
    assert lines and lines[0].startswith("send window 64 -> "), lines
    # At most one line every 10 s, each for a change of at least twice or half.
    assert len(lines) <= 1 + run.timeline[-1][0] // 10, lines


async def test_an_overload_is_logged_once_not_per_send(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_drain.worker")
    run = await start(nursery, 5_000, ScriptedBroker(latency=0.01, capacity=20))
    await run.until_done(5_000)
    said = [r for r in caplog.records if "the broker is overloaded" in r.getMessage()]
    assert 1 <= len(said) <= 3 < run.broker.overloaded, [r.getMessage() for r in said]
