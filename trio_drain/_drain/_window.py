"""The send window's policy: how many sends may be outstanding, from what the sends measure.

A fixed window suits one broker latency only. By Little's law a window of W
sends over a round trip of R seconds moves at most W/R rows a second, so 64
is plenty on loopback and caps a drain at about 1,300 rows a second against
a broker 50 ms away. And the worker's own pipeline (claims and outcome
writes in batches) moves more rows per CPU second with a wider window, up
to a point past which a wider window only makes every row wait longer.

So the worker sizes its window itself, between a small floor and
`max_inflight`. This module is the policy, in the manner of Netflix's
concurrency-limits (a limit fed round-trip samples, apart from how slots
are handed out) and of TCP's congestion control (slow start, BBR's probing,
AIMD); the worker is the mechanism (a `trio.CapacityLimiter` whose
`total_tokens` it sets to `WindowController.window`). It does no I/O and
reads no clock: times are passed in, in seconds.

What it is told, and what it measures:

- every answer, with its round trip (send to answer);
- every ``overloaded`` answer, with the time its send left;
- every claim, and whether it found all the rows it asked for. When a claim
  comes back short, the outbox is the limit, not the window: such a round
  teaches nothing about the window and changes nothing.

It measures in rounds of at least `min_round` seconds and one and a half
round trips: the throughput (answers a second) and the mean round trip.
The fastest answer of the last `base_span` seconds is the *base* round
trip. Sends queue somewhere (ours or the broker's) when the round trip is
well above it (`queueing`), or when the last probe moved the round trip in
step with the window (by Little's law a queue at a steady throughput makes
the round trip grow as the window does; a far broker's round trip does not
move with the window).

How the window moves:

1. Slow start: one more slot per answer (the window doubles every round
   trip) while claims find rows, from 64 until the window reaches
   `max_inflight` or two rounds in a row bring less than a quarter more
   throughput.
2. Then it probes, one step at a time, each step judged by the throughput
   of a round measured after a round of settling, against the throughput
   before the step:

   - while sends do not queue, a wider window costs nothing, so it probes
     upward (`step`): kept if the throughput grew by `gain`, and then the
     next upward step is larger (a run of kept steps grows like slow
     start, so a broker that got slower is followed within a second or
     two);
   - while sends queue, it probes downward, by more when the round trip is
     many times its base: kept if the throughput stays within `tolerance`
     of the best of the last `peak_span` seconds (so small losses cannot
     add up); every `refresh` seconds it probes downward anyway, to find a
     lower base;
   - a step not kept is undone and the other way is tried; when both fail
     probes come less and less often (up to every `max_interval` rounds):
     around its best window the controller sits still, with an occasional
     probe, instead of oscillating.

   A round trip that jumps at a steady window (the broker's latency
   changed, not our window) starts probing again at once.
3. An ``overloaded`` answer cuts the window to `backoff` of what it was,
   once per episode (answers within a round trip of the cut, or to sends
   that left before it, belong to the episode already answered), and a
   refused send's slot is never filled again at once (that send would only
   be refused too). For `hold` seconds upward probes stop short of what
   the broker took (the window less the sends it refused; `hold` doubles
   each time the broker overflows again, up to `max_hold`; a probe past it
   that is kept forgets it). So against a broker that takes K sends at a
   time the window settles just under K.
"""

from __future__ import annotations

import collections
import enum
import math

import attrs


class Phase(enum.Enum):
    """What the controller is doing."""

    STARTUP = "startup"  # slow start: one more slot per answer
    CRUISE = "cruise"  # measuring the window as it stands
    PROBE_UP = "probe_up"  # trying a wider window
    PROBE_DOWN = "probe_down"  # trying a narrower one


@attrs.frozen
class Round:
    """What one round measured."""

    #: The window during the round (the one it settled at, for a probe).
    window: int
    #: Answers a second.
    throughput: float
    #: Mean seconds from send to answer.
    rtt: float
    #: Whether the window was the limit (every claim found all it asked for).
    limited: bool


@attrs.define
class WindowController:
    """Decides the window of sends outstanding, from samples (see the module docstring).

    Args:
        ceiling: the largest window (`DrainConfig.max_inflight`).
        floor: the smallest window (no more than `ceiling`).
        initial: the window slow start begins with.
        min_round: shortest round, in seconds.
        gain: share of throughput a wider window must add to be kept.
        tolerance: share of the best throughput a narrower window may cost and be kept.
        step: the factor of a first probe (its inverse downward).
        max_step: the largest factor of a run of kept upward probes.
        queueing: a round trip this many times the base means sends queue.
        jump: a round trip this many times the last (or a fraction as
            small) at a steady window means the broker's latency changed.
        base_span: seconds over which the base round trip is remembered.
        peak_span: seconds over which the best throughput is remembered.
        backoff: the factor an ``overloaded`` answer cuts the window by.
        hold: seconds upward probes stop short of an overflow's window.
        max_hold: the longest `hold` grows to.
        max_interval: the most rounds between probes.
        refresh: seconds after which a downward probe is made even though
            sends do not seem to queue (the base round trip is only ever
            measured at windows tried: this finds a lower one).
    """

    ceiling: int
    floor: int = 4
    initial: int = 64
    min_round: float = 0.1
    gain: float = 0.05
    tolerance: float = 0.04
    step: float = 1.25
    max_step: float = 2.0
    queueing: float = 1.25
    jump: float = 1.5
    base_span: float = 30.0
    peak_span: float = 5.0
    backoff: float = 0.8
    hold: float = 5.0
    max_hold: float = 60.0
    max_interval: int = 16
    refresh: float = 10.0

    #: What it is doing.
    phase: Phase = attrs.field(default=Phase.STARTUP, init=False)
    #: Why the window last changed.
    reason: str = attrs.field(default="start", init=False)
    #: The last round measured (None before the first).
    last_round: Round | None = attrs.field(default=None, init=False)

    _w: float = attrs.field(default=0.0, init=False)
    # The current round.
    _start: float = attrs.field(default=-math.inf, init=False)
    _end: float = attrs.field(default=-math.inf, init=False)
    _planned: float = attrs.field(default=0.0, init=False)
    _answers: int = attrs.field(default=0, init=False)
    _rtt_sum: float = attrs.field(default=0.0, init=False)
    _rtt_min: float = attrs.field(default=math.inf, init=False)
    _short: bool = attrs.field(default=False, init=False)
    _last_rtt: float = attrs.field(default=0.0, init=False)
    # (time, round trip) and (time, throughput) of recent limited rounds.
    _rtts: collections.deque[tuple[float, float]] = attrs.field(factory=collections.deque, init=False)
    _peaks: collections.deque[tuple[float, float]] = attrs.field(factory=collections.deque, init=False)
    # Slow start.
    _best: float = attrs.field(default=0.0, init=False)
    _flat: int = attrs.field(default=0, init=False)
    # The window as it stands: its throughput and round trip, over `_ref_n` rounds.
    _ref_x: float = attrs.field(default=0.0, init=False)
    _ref_rtt: float = attrs.field(default=0.0, init=False)
    _ref_n: int = attrs.field(default=0, init=False)
    _wait: int = attrs.field(default=1, init=False)  # rounds until the next probe
    _fails: int = attrs.field(default=0, init=False)  # probes undone in a row
    _run: int = attrs.field(default=0, init=False)  # upward probes kept in a row
    _up_next: bool = attrs.field(default=True, init=False)
    _skip: bool = attrs.field(default=False, init=False)  # the next cruise round is a transient
    # A probe: the window it left, and whether its settling round is over.
    _from: float = attrs.field(default=0.0, init=False)
    _settled: bool = attrs.field(default=False, init=False)
    _down_at: float = attrs.field(default=-math.inf, init=False)  # the last downward probe
    # How the round trip moved with the window at the last probe: d log(rtt) / d log(window).
    # About 1 where sends queue (Little's law at a steady throughput), about 0 where they do not.
    _slope: float = attrs.field(default=0.0, init=False)
    _bold: bool = attrs.field(default=True, init=False)  # the last step down cost nothing
    # Overloads.
    _limit: float = attrs.field(default=math.inf, init=False)
    _limit_until: float = attrs.field(default=-math.inf, init=False)
    _hold_now: float = attrs.field(default=0.0, init=False)
    _cut_at: float = attrs.field(default=-math.inf, init=False)
    _overflowed: float = attrs.field(default=0.0, init=False)  # the window of the last episode
    _refused: int = attrs.field(default=0, init=False)  # sends refused in it

    def __attrs_post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, got {self.ceiling}")
        self.floor = max(1, min(self.floor, self.ceiling))
        self._w = float(min(max(self.initial, self.floor), self.ceiling))
        self._hold_now = self.hold
        if self._w >= self.ceiling:
            self.phase = Phase.CRUISE

    @property
    def window(self) -> int:
        """Sends that may be outstanding now."""
        return max(self.floor, min(self.ceiling, int(self._w + 0.5)))

    # -- samples

    def answered(self, now: float, rtt: float) -> None:
        """A send was answered (other than ``overloaded``) `rtt` seconds after it left."""
        self._answers += 1
        self._rtt_sum += rtt
        if rtt < self._rtt_min:
            self._rtt_min = rtt
        if self.phase is Phase.STARTUP and not self._short:
            self._w += 1.0
            if self._w >= self.ceiling:
                self._w = float(self.ceiling)
                self._to_cruise("slow start reached max_inflight")
        if now >= self._end:
            self._end_round(now)

    def claimed(self, *, full: bool) -> None:
        """A claim came back; `full`: it found every row it asked for."""
        if not full:
            self._short = True

    def overloaded(self, now: float, *, sent_at: float, in_flight: int) -> None:
        """The broker answered ``overloaded`` to a send that left at `sent_at`;
        `in_flight`: sends outstanding, this one included."""
        # The refused send's slot is not to be filled again at once (that
        # would only be refused too): the window stays under what is out.
        ceiling = max(float(self.floor), in_flight - 1.0)
        if sent_at <= self._cut_at + 0.001 or now < self._cut_at + self._last_rtt:
            # The episode already answered (one cut a round trip at most):
            # what the broker took is the window less what it refused.
            self._refused += 1
            self._limit = min(self._limit, max(float(self.floor), self._overflowed - self._refused))
            self._w = min(self._w, ceiling)
            return
        before = self._w
        if now < self._limit_until and before > self._limit:
            self._hold_now = min(self._hold_now * 2, self.max_hold)
        if now >= self._limit_until:
            self._limit = math.inf
        self._overflowed, self._refused = before, 1
        self._limit = min(self._limit, max(float(self.floor), before - 1))
        self._limit_until = now + self._hold_now
        self._cut_at = now
        self._w = max(float(self.floor), min(before * self.backoff, ceiling))
        self._run = 0
        self._up_next = False
        self._to_cruise("the broker answered overloaded")
        self._new_round(now)

    # -- rounds

    def _new_round(self, now: float) -> None:
        self._planned = max(self.min_round, 1.5 * self._last_rtt)
        self._start = now
        self._end = now + self._planned
        self._answers = 0
        self._rtt_sum = 0.0
        self._rtt_min = math.inf
        self._short = False

    def _end_round(self, now: float) -> None:
        answers, elapsed = self._answers, now - self._start
        # A round that ran far past its plan spanned an idle spell: no measure.
        if answers and 0 < elapsed <= 2 * self._planned:
            rtt = self._rtt_sum / answers
            self._last_rtt = rtt
            measured = Round(self.window, answers / elapsed, rtt, not self._short)
            self.last_round = measured
            if measured.limited:
                self._decide(measured, self._rtt_min, now)
        self._new_round(now)

    def _decide(self, r: Round, fastest: float, now: float) -> None:
        self._remember(now, r, fastest)
        if self.phase is Phase.STARTUP:
            if r.throughput >= self._best * 1.25:
                self._best, self._flat = r.throughput, 0
            else:
                self._flat += 1
                if self._flat >= 2:
                    self._to_cruise("throughput stopped growing in slow start")
                    self._up_next = False  # it just did grow, for nothing: look down first
        elif self.phase is Phase.CRUISE:
            self._cruise(r, fastest, now)
        elif not self._settled:
            self._settled = True  # the round the step took effect in: not a fair measure
        else:
            self._judge(r, now)

    def _remember(self, now: float, r: Round, fastest: float) -> None:
        rtts, peaks = self._rtts, self._peaks
        while rtts and rtts[-1][1] >= fastest:  # a running minimum: older, larger ones never win
            rtts.pop()
        rtts.append((now, fastest))
        while rtts[0][0] < now - self.base_span:
            rtts.popleft()
        while peaks and peaks[-1][1] <= r.throughput:
            peaks.pop()
        peaks.append((now, r.throughput))
        while peaks[0][0] < now - self.peak_span:
            peaks.popleft()

    def _base(self) -> float:
        return self._rtts[0][1] if self._rtts else 0.0

    def _peak(self) -> float:
        return self._peaks[0][1] if self._peaks else 0.0

    def _forget(self, now: float, r: Round, fastest: float) -> None:
        """The broker's latency changed: what was learned before no longer holds."""
        self._rtts.clear()
        self._peaks.clear()
        self._remember(now, r, fastest)

    # -- cruising and probing

    def _to_cruise(self, reason: str) -> None:
        if self.phase is Phase.STARTUP:
            self._down_at = self._start  # the first refresh comes `refresh` seconds from here
        self.phase = Phase.CRUISE
        self.reason = reason
        self._ref_n = 0
        self._wait = 1

    def _cruise(self, r: Round, fastest: float, now: float) -> None:
        if self._skip:
            self._skip = False  # the round a step was undone in
            return
        if self._ref_n and (r.rtt > self._ref_rtt * self.jump or r.rtt * self.jump < self._ref_rtt):
            # The round trip jumped while the window held still: the broker's
            # latency moved. Measure afresh and probe at once. (A lower round
            # trip needs no forgetting: the base takes it as it comes.)
            if r.rtt > self._ref_rtt:
                self._forget(now, r, fastest)
                self._slope = 0.0
            self._ref_n, self._wait, self._fails, self._up_next = 0, 1, 0, True
        n = min(self._ref_n, 3)  # a moving mean of the last few rounds
        self._ref_x = (self._ref_x * n + r.throughput) / (n + 1)
        self._ref_rtt = (self._ref_rtt * n + r.rtt) / (n + 1)
        self._ref_n = n + 1
        self._wait -= 1
        if self._wait <= 0:
            self._probe(now)

    def _probe(self, now: float) -> None:
        w = self._w
        up = min(float(self.ceiling), w * min(self.max_step, self.step ** (1 + self._run)))
        if now < self._limit_until:
            up = min(up, self._limit - 1)
        can_up, can_down = up >= w + 1, w > self.floor
        queueing = (
            self._ref_rtt > self._base() * self.queueing
            or self._slope > 0.5
            or now - self._down_at >= self.refresh
        )
        if can_down and queueing and not (self._up_next and can_up):
            # Far past the knee (the round trip many times its base), a
            # longer step, unless the last one down cost throughput.
            base = self._base()
            far = self._ref_rtt / base if base > 0 and self._bold else 1.0
            factor = min(self.max_step, max(self.step, math.sqrt(far)))
            self.phase, self._w = Phase.PROBE_DOWN, max(float(self.floor), w / factor)
            self._down_at = now
        elif can_up and (self._up_next or not queueing):
            self.phase, self._w = Phase.PROBE_UP, up
        else:  # nowhere to go: look again later
            self._wait = min(2 ** max(1, self._fails), self.max_interval)
            return
        self._from, self._settled = w, False

    def _judge(self, r: Round, now: float) -> None:
        if self._ref_rtt > 0 and r.rtt > 0 and self._w != self._from:
            self._slope = math.log(r.rtt / self._ref_rtt) / math.log(self._w / self._from)
        if self.phase is Phase.PROBE_UP:
            if r.throughput >= self._ref_x * (1 + self.gain):
                if self._w > self._limit:  # past an old overflow and kept: forget it
                    self._limit, self._limit_until, self._hold_now = math.inf, -math.inf, self.hold
                self._run += 1
                self._kept(r, "throughput grew with a wider window", wait=1, up_next=True)
            else:
                self._undo(up_next=False)
        elif r.throughput >= max(self._ref_x, self._peak()) * (1 - self.tolerance):
            self._run = 0
            self._bold = True
            self._kept(r, "round trips rose without more throughput", wait=1, up_next=False)
        else:
            self._bold = False
            self._undo(up_next=True)

    def _kept(self, r: Round, reason: str, *, wait: int, up_next: bool) -> None:
        self.phase, self.reason = Phase.CRUISE, reason
        self._ref_x, self._ref_rtt, self._ref_n = r.throughput, r.rtt, 1
        self._fails = 0
        self._wait = wait
        self._up_next = up_next

    def _undo(self, *, up_next: bool) -> None:
        self.phase = Phase.CRUISE
        self._w = self._from
        self._run = 0
        self._skip = True  # the round it takes effect in says nothing; then the old measure goes on
        # One way failed: try the other at once. Both failed: the window
        # is where it should be, and probes come less and less often.
        self._fails += 1
        self._wait = 1 if self._fails == 1 else min(2 ** (self._fails - 1), self.max_interval)
        self._up_next = up_next
