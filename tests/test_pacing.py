"""The route pacer (policy only): slow start, the rate it learns from a
broker's refusals, and how it probes upward. Times are plain seconds."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from trio_drain._brokers._pacing import RoutePacer, StatedLimit, stated_limit

REAL_BROKER = "rate_limit: max 60 msg/min (burst 10) — slow down"


def test_the_real_brokers_refusal_states_its_limit() -> None:
    assert stated_limit(REAL_BROKER) == StatedLimit(per_second=1.0, burst=10)
    assert stated_limit("rate_limit: max 600 msg/min (burst 20)") == StatedLimit(10.0, 20)
    assert stated_limit("too many: 5 messages per second") == StatedLimit(5.0, None)
    assert stated_limit("rate_limit") is None
    assert stated_limit("overloaded: 100 sends waiting") is None


def test_slow_start_lets_the_window_grow_by_one_per_answer() -> None:
    pacer = RoutePacer(window=64, initial_window=4)
    assert pacer.may_send(3, 0.0) and not pacer.may_send(4, 0.0)
    for _ in range(4):
        pacer.answered(0.0, accepted=True)
    assert pacer.cap == 8 and pacer.may_send(7, 0.0) and not pacer.may_send(8, 0.0)
    for _ in range(56):
        pacer.answered(0.0, accepted=True)
    assert pacer.cap is None and pacer.may_send(10_000, 0.0), "slow start ends at the worker's window"
    assert not pacer.paced


def test_no_slow_start_when_the_window_is_small_already() -> None:
    assert RoutePacer(window=1).cap is None
    assert RoutePacer(window=16, initial_window=16).cap is None


def test_a_stated_limit_paces_just_under_it_and_is_never_probed_past() -> None:
    pacer = RoutePacer(window=64)
    assert pacer.refused(0.0, sent_at=0.0, text=REAL_BROKER)
    assert pacer.paced and pacer.rate == 0.98
    assert pacer.allowance(0.0) == 0, "the broker's bucket is empty after a refusal"
    assert math.isclose(pacer.next_send_at(0.0), 1 / 0.98)
    # A route sending all it may for ten minutes never goes past the stated rate.
    sent, now = 0, 0.0
    while now < 600:
        now = pacer.next_send_at(now)
        assert pacer.may_send(0, now)
        pacer.took(now)
        pacer.answered(now, accepted=True)
        sent += 1
    assert pacer.rate == 0.98
    assert 0.97 * 600 <= sent <= 0.99 * 600


def test_refusals_of_sends_that_left_before_the_rate_was_lowered_change_nothing() -> None:
    pacer = RoutePacer(window=64)
    pacer.refused(1.0, sent_at=0.9, text=REAL_BROKER)
    rate = pacer.rate
    # The rest of the burst that was already on its way comes back refused.
    for _ in range(10):
        assert not pacer.refused(1.01, sent_at=0.95, text=REAL_BROKER)
    assert pacer.rate == rate and pacer.refusals == 11


def test_without_a_stated_limit_the_first_guess_spreads_what_was_accepted() -> None:
    pacer = RoutePacer(window=64, guess_span=10.0)
    for _ in range(10):  # a burst of 10 went through at once
        pacer.answered(5.0, accepted=True)
    pacer.refused(5.0, sent_at=5.0, text="rate_limit")
    assert pacer.rate == 1.0


def test_later_refusals_pace_toward_what_the_broker_let_through_halving_at_most() -> None:
    pacer = RoutePacer(window=64, measured_margin=0.9)
    pacer.refused(0.0, sent_at=0.0, text="overloaded")  # nothing accepted before: the floor
    assert pacer.rate == pacer.min_rate
    pacer.rate = 10.0  # as if it had probed up since
    now, rates = 0.0, []
    for _ in range(4):  # each time, ten seconds at 2 a second got through, then a refusal
        for i in range(20):
            pacer.answered(now + i / 2, accepted=True)
        now += 10
        pacer.refused(now, sent_at=now - 0.1, text="overloaded")
        assert pacer.rate is not None
        rates.append(round(pacer.rate, 3))
    assert rates == [4.5, 2.025, 1.8, 1.62], (
        "each refusal lowers the pace; the measure keeps it from collapsing"
    )


def test_a_refusal_after_a_quiet_spell_does_not_collapse_the_pace() -> None:
    pacer = RoutePacer(window=64)
    pacer.refused(0.0, sent_at=0.0, text=REAL_BROKER.replace("60 msg/min", "600 msg/min"))
    assert pacer.rate == 9.8
    # An hour of one send a minute, then someone else empties the member's bucket.
    for minute in range(60):
        pacer.took(60.0 * minute)
        pacer.answered(60.0 * minute, accepted=True)
    pacer.refused(3600.0, sent_at=3599.0, text=REAL_BROKER.replace("60 msg/min", "600 msg/min"))
    assert pacer.rate is not None and pacer.rate >= 9.8 / 2 * 0.9


def test_a_paced_route_idle_long_enough_returns_to_slow_start_and_remembers_its_rate() -> None:
    pacer = RoutePacer(window=64, idle_after=300.0)
    pacer.rate = 3.0
    pacer.took(0.0)
    assert not pacer.rest(299.0) and pacer.paced
    assert pacer.rest(300.0) and not pacer.paced and pacer.cap == 16
    pacer.refused(400.0, sent_at=400.0, text="overloaded")
    assert pacer.rate == 3.0, "the first refusal after a rest starts from what was learned"


def test_a_busy_route_probes_upward_fast_then_slowly_after_a_refusal_under_pacing() -> None:
    pacer = RoutePacer(window=64, min_rate=1.0, fast_growth=2.0, slow_growth=1.1, probe_interval=10.0)
    pacer.refused(0.0, sent_at=0.0, text="overloaded")
    assert pacer.rate == 1.0
    now = 0.0
    while now < 3.5:  # send all it allows, with more waiting: the bucket holds it back, so it probes
        now = pacer.next_send_at(now)
        pacer.took(now)
        pacer.held_back(now)
    assert pacer.rate is not None and pacer.rate >= 4.0, "fast growth: doubling a second"
    fast_rate = pacer.rate
    pacer.refused(now + 0.01, sent_at=now + 0.005, text="overloaded")
    lowered = pacer.rate
    assert lowered is not None and lowered < fast_rate
    start = now = now + 0.01
    while now < start + 25:
        now = pacer.next_send_at(now)
        pacer.took(now)
        pacer.held_back(now)
    assert pacer.rate is not None and lowered < pacer.rate <= lowered * 1.1**3 + 1e-9, "slow growth"


def test_an_idle_route_does_not_probe() -> None:
    pacer = RoutePacer(window=64)
    pacer.refused(0.0, sent_at=0.0, text=REAL_BROKER.replace("60 msg/min", "6000 msg/min"))
    rate = pacer.rate
    for minute in range(120):  # a send a minute, never more due than the bucket allows
        pacer.took(60.0 * minute)
    assert pacer.rate == rate


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from(["ok", "error", "refused", "send"])), max_size=80))
def test_the_pacer_never_lets_a_burst_past_its_bucket_nor_stalls(events: list[tuple[float, str]]) -> None:
    pacer = RoutePacer(window=64)
    now = 0.0
    for step, event in events:
        now += step
        if event == "ok":
            pacer.answered(now, accepted=True)
        elif event == "error":
            pacer.answered(now, accepted=False)
        elif event == "refused":
            pacer.refused(now, sent_at=now - step / 2, text="rate_limit")
        elif pacer.may_send(0, now):
            pacer.took(now)
            pacer.held_back(now)
        if pacer.paced:
            assert pacer.rate is not None and pacer.rate >= pacer.min_rate
            assert pacer.tokens(now) <= max(1.0, pacer.rate * 0.1) + 1e-9
            assert pacer.next_send_at(now) <= now + 1 / pacer.rate + 1e-9, "a token always comes"
