"""The window controller alone (`_drain/_window.py`): a pure policy fed samples.

A small fluid model stands in for the worker and its broker: with a window
of W, a broker `latency` seconds away that serves at most `rate` sends a
second has W / max(latency, W / rate) answers a second, each after
max(latency, W / rate) seconds (past the knee W = rate * latency, sends only
queue); with a `capacity`, the sends past it are answered ``overloaded``.
Time is a counter: every run is the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import attrs
import hypothesis.strategies as st
from hypothesis import given, settings

from trio_drain._drain._window import Phase, WindowController


@attrs.define
class Model:
    """The system a controller drives, stepped `dt` seconds at a time."""

    latency: Callable[[float], float] | float
    rate: float = 1e9
    capacity: int | None = None
    demand: Callable[[float], bool] = lambda now: True  # are rows waiting?
    dt: float = 0.001
    now: float = 0.0
    answered: int = 0
    refused: int = 0
    #: (time, window, answers a second), every 0.1 s.
    trace: list[tuple[float, int, float]] = attrs.field(factory=list)
    _carry: float = 0.0
    _carry_refused: float = 0.0

    def run(self, controller: WindowController, seconds: float) -> None:
        end = self.now + seconds
        next_trace = self.now
        while self.now < end:
            latency = self.latency(self.now) if callable(self.latency) else self.latency
            w = controller.window
            rtt = max(latency, w / self.rate)
            per_second = w / rtt
            if not self.demand(self.now):
                per_second = min(per_second, 100.0)  # a trickle: the outbox is the limit
                controller.claimed(full=False)
            else:
                controller.claimed(full=True)
            if self.capacity is not None and w > self.capacity:
                self._carry_refused += per_second * (w - self.capacity) / w * self.dt
                per_second *= self.capacity / w
            self._carry += per_second * self.dt
            while self._carry >= 1:
                self._carry -= 1
                self.answered += 1
                controller.answered(self.now, rtt)
            while self._carry_refused >= 1:
                self._carry_refused -= 1
                self.refused += 1
                controller.overloaded(self.now, sent_at=self.now - latency, in_flight=w)
            if self.now >= next_trace:
                self.trace.append((self.now, controller.window, per_second))
                next_trace += 0.1
            self.now += self.dt

    def windows(self, since: float, until: float = math.inf) -> list[int]:
        return [w for t, w, _ in self.trace if since <= t < until]

    def rates(self, since: float, until: float = math.inf) -> list[float]:
        return [x for t, _, x in self.trace if since <= t < until]


def test_it_starts_at_64_or_max_inflight_if_lower_and_never_leaves_its_bounds() -> None:
    assert WindowController(ceiling=1024).window == 64
    assert WindowController(ceiling=16).window == 16
    assert WindowController(ceiling=1).window == 1
    assert WindowController(ceiling=1).floor == 1


def test_slow_start_grows_one_slot_per_answer_while_claims_find_rows() -> None:
    c = WindowController(ceiling=1024)
    for i in range(10):
        c.answered(0.001 * i, 0.01)
    assert (c.phase, c.window) == (Phase.STARTUP, 74)


def test_slow_start_does_not_grow_while_the_outbox_is_the_limit() -> None:
    c = WindowController(ceiling=1024)
    c.answered(0.0, 0.01)  # the first round begins
    c.claimed(full=False)
    for i in range(100):
        c.answered(0.0001 * i, 0.01)
    assert c.window == 65


def test_against_a_far_broker_the_window_reaches_max_inflight_within_a_second() -> None:
    c, m = WindowController(ceiling=1024), Model(latency=0.05)
    m.run(c, 1.0)
    assert c.window == 1024
    m.run(c, 20.0)
    assert min(m.windows(5.0)) >= 819  # an occasional probe downward, one step, no more


def test_past_the_knee_the_window_narrows_to_it_without_losing_throughput() -> None:
    # 2,000 sends a second after 10 ms: the knee is a window of 20.
    c, m = WindowController(ceiling=1024), Model(latency=0.01, rate=2000)
    m.run(c, 20.0)
    late = m.windows(10.0)
    assert max(late) <= 2 * 20 and min(late) >= 20 * 0.75, late
    assert min(m.rates(10.0)) >= 0.75 * 2000  # a probe below the knee costs a round, no more
    assert sum(m.rates(10.0)) / len(m.rates(10.0)) >= 0.95 * 2000


def test_a_wider_window_is_kept_only_for_more_throughput() -> None:
    # At 1,000 sends a second and 1 ms, no window past 1 adds throughput;
    # the round trip grows with every slot: the window comes down.
    c, m = WindowController(ceiling=1024), Model(latency=0.001, rate=1000)
    m.run(c, 30.0)
    assert max(m.windows(20.0)) <= 16


def test_the_window_holds_still_at_a_steady_state() -> None:
    c, m = WindowController(ceiling=1024), Model(latency=0.005, rate=10_000)
    m.run(c, 30.0)
    late = m.windows(15.0)
    # A probe is one step up or down and back: never more than that apart.
    assert max(late) <= min(late) * c.step**2 + 1, late
    changes = sum(1 for a, b in itertools.pairwise(late) if a != b)
    assert changes <= 40, changes  # about one probe a second at most, each two changes


def test_after_the_brokers_latency_rises_the_window_opens_within_two_seconds() -> None:
    # 10,000 a second at most: the knee moves from 10 (1 ms) to 200 (20 ms) and back.
    def latency(now: float) -> float:
        return 0.02 if 5 <= now < 10 else 0.001

    c, m = WindowController(ceiling=1024), Model(latency=latency, rate=10_000)
    m.run(c, 15.0)
    for step in (5.0, 10.0):
        after = [t for t, _, x in m.trace if t >= step and x >= 0.85 * 10_000]
        assert after and after[0] - step <= 2.0, (step, after[:1])
    assert min(m.windows(8.0, 10.0)) >= 150
    assert max(m.windows(13.0, 15.0)) <= 100


def test_an_overload_cuts_the_window_once_per_episode() -> None:
    c = WindowController(ceiling=1024, initial=200)
    c.answered(0.0, 0.01)
    c.answered(0.11, 0.01)  # a round: the last round trip is known
    before = c.window
    for _ in range(30):  # one burst of refusals, from sends that left before the cut
        c.overloaded(0.12, sent_at=0.115, in_flight=before)
    cut = c.window
    assert cut == round(before * 0.8)
    c.overloaded(0.125, sent_at=0.122, in_flight=cut)  # within a round trip of the cut: the same episode
    assert c.window == cut - 1  # its slot is not filled again, no more
    c.overloaded(0.3, sent_at=0.29, in_flight=cut - 1)  # a new episode
    assert c.window == round((cut - 1) * 0.8)


def test_within_the_hold_upward_probes_stop_short_of_where_the_broker_overflowed() -> None:
    c, m = WindowController(ceiling=1024), Model(latency=0.01, capacity=100)
    m.run(c, 20.0)
    late = m.windows(5.0)
    assert max(late) <= 105 and min(late) >= 75, late
    assert m.refused / (m.answered + m.refused) < 0.01


def test_against_a_capacity_probes_past_it_grow_rarer() -> None:
    c, m = WindowController(ceiling=1024), Model(latency=0.01, capacity=100)
    m.run(c, 120.0)
    overflows_late = [t for t, w, _ in m.trace if t > 60 and w > 100]
    assert len(overflows_late) <= 3, overflows_late  # the hold doubled: a probe past it a minute
    assert m.refused / (m.answered + m.refused) < 0.01


def test_an_idle_spell_teaches_nothing() -> None:
    def busy(now: float) -> bool:
        return not 5 <= now < 10

    c, m = WindowController(ceiling=1024), Model(latency=0.01, rate=2000, demand=busy)
    m.run(c, 5.0)
    settled = c.window
    m.run(c, 5.0)  # the outbox runs dry: a trickle of rows, the window not the limit
    assert c.window == settled


def test_a_fixed_ceiling_of_one_is_the_seed_schedule() -> None:
    c, m = WindowController(ceiling=1), Model(latency=0.001)
    m.run(c, 2.0)
    assert set(m.windows(0.0)) == {1}


events = st.lists(
    st.tuples(
        st.sampled_from(["answer", "overload", "short"]),
        st.floats(0.0, 0.2),  # time passing before it
        st.floats(0.0001, 2.0),  # round trip
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(events=events, ceiling=st.integers(1, 4096))
def test_whatever_it_is_told_the_window_stays_between_floor_and_ceiling(
    events: list[tuple[str, float, float]], ceiling: int
) -> None:
    c = WindowController(ceiling=ceiling)
    now = 0.0
    for kind, gap, rtt in events:
        now += gap
        if kind == "answer":
            c.answered(now, rtt)
        elif kind == "overload":
            c.overloaded(now, sent_at=now - rtt, in_flight=c.window)
        else:
            c.claimed(full=False)
        assert c.floor <= c.window <= ceiling
