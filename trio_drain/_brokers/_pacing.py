"""How fast one route may send: a token bucket that learns a broker's limit.

Brokers protect themselves: the real broker lets a member send a burst of
10 and then 60 a minute, and answers anything faster with a `rate_limit`
error. Such a refusal is back-pressure, not a failure: the row loses no
attempt (the state machine gives it back) and the route slows down. (An
`overloaded` answer, too many sends waiting at the broker, narrows the
worker's window instead: `_drain/_window.py`.) This module is
the policy of how much; the worker is the mechanism (which rows it claims
and when it sends them). It does no I/O and reads no clock: times are
passed in, in seconds.

A route starts unpaced, in *slow start*: at most `initial_window` sends of
it are unanswered at once, one more for every answer, until the window is
the worker's whole window. Without it, a fresh drain would put its whole
window on a rate-limited route before the first refusal came back, and
all but the broker's burst would be refused.

The first refusal ends slow start and paces the route with a token bucket.
Its rate comes, in order of trust, from:

1. the broker's own words: the real broker says
   ``rate_limit: max 60 msg/min (burst 10)``; we keep a small margin
   under the rate it states and never probe past it;
2. what it let through: after a refusal under pacing, the sends accepted
   in the last `guess_span` seconds (a broker that refuses whatever
   exceeds its refill rate lets a saturating sender through at exactly
   that rate), but never less than half the rate we had: a refusal after
   a quiet spell (another process using the same member's bucket) must
   not collapse the pace;
3. at the very first refusal with neither: what it accepted in the last
   `guess_span` seconds, spread over that span (a burst is commonly a few
   seconds' worth of the rate), or the rate learned before, if the route
   was paced once.

While nothing is refused and the route has more due rows than its bucket
lets go (the worker says so with `held_back`), the rate probes upward:
fast (`fast_growth` a second) until the first refusal under pacing, then
slowly (`slow_growth` every `probe_interval`), so a limit that was raised
is found again without a storm of refusals. An idle route learns nothing
and probes nothing. Refusals of sends that left before the rate was last
lowered belong to the episode already answered and change nothing. A
paced route that has sent nothing for `idle_after` seconds goes back to
slow start (its broker's bucket has refilled meanwhile), keeping what it
learned for the next refusal.
"""

from __future__ import annotations

import collections
import math
import re

import attrs

_STATED_RATE = re.compile(
    r"(\d+(?:\.\d+)?)\s*(?:msgs?|messages?|sends?|requests?)?\s*(?:/|per\s+)\s*(min(?:ute)?|s(?:ec(?:ond)?)?)\b",
    re.I,
)
# Token counts are sums of float products: "one token at next_send_at" must
# not come out as 0.9999999.
_EPSILON = 1e-9
_STATED_BURST = re.compile(r"burst\D{0,3}(\d+)", re.I)


@attrs.frozen
class StatedLimit:
    """A rate limit as a broker's refusal states it."""

    per_second: float
    burst: int | None = None


def stated_limit(text: str) -> StatedLimit | None:
    """The limit a refusal's text states, if it states one.

    >>> stated_limit("rate_limit: max 60 msg/min (burst 10) — slow down")
    StatedLimit(per_second=1.0, burst=10)
    """
    found = _STATED_RATE.search(text)
    if found is None:
        return None
    amount = float(found.group(1))
    per_second = amount / 60 if found.group(2).lower().startswith("m") else amount
    if not per_second > 0 or not math.isfinite(per_second):
        return None
    burst = _STATED_BURST.search(text)
    return StatedLimit(per_second, int(burst.group(1)) if burst else None)


@attrs.define
class RoutePacer:
    """One route's allowance: slow start, then a learned token bucket.

    Args:
        window: the worker's whole window; slow start ends when it is reached.
        initial_window: unanswered sends allowed at first.
        stated_margin: share of a stated rate we use (clocks differ).
        measured_margin: share of a measured rate we fall back to.
        min_rate: never slower than this (sends a second), unless the
            broker states a lower rate.
        guess_span: seconds of accepted sends that the first guess spreads.
        fast_growth, slow_growth: rate multipliers of the upward probe.
        probe_interval: seconds between slow probe steps.
        idle_after: seconds without a send after which pacing ends.
    """

    window: int
    initial_window: int = 16
    stated_margin: float = 0.98
    measured_margin: float = 0.9
    min_rate: float = 0.05
    guess_span: float = 10.0
    fast_growth: float = 1.25
    slow_growth: float = 1.02
    probe_interval: float = 10.0
    idle_after: float = 300.0

    #: Sends a second, or None while the route is not paced.
    rate: float | None = attrs.field(default=None, init=False)
    #: Slow start's cap on unanswered sends; None once it is over.
    cap: int | None = attrs.field(default=None, init=False)
    refusals: int = attrs.field(default=0, init=False)
    #: Sends of the routes paced by this pacer that await an answer (kept by
    #: the worker; slow start compares it with `cap`).
    unanswered: int = attrs.field(default=0, init=False)
    _ceiling: float = attrs.field(default=math.inf, init=False)
    _burst: float = attrs.field(default=math.inf, init=False)
    _tokens: float = attrs.field(default=0.0, init=False)
    _stamp: float = attrs.field(default=0.0, init=False)
    _set_at: float = attrs.field(default=-math.inf, init=False)
    _fast: bool = attrs.field(default=True, init=False)
    _last_send: float = attrs.field(default=-math.inf, init=False)
    _remembered: float | None = attrs.field(default=None, init=False)
    _next_probe: float = attrs.field(default=math.inf, init=False)
    # Accepted sends per whole second, for the first guess.
    _recent: collections.deque[list[int]] = attrs.field(factory=collections.deque, init=False)

    def __attrs_post_init__(self) -> None:
        self.cap = self.initial_window if self.initial_window < self.window else None

    @property
    def paced(self) -> bool:
        return self.rate is not None

    # -- what may go now

    def may_send(self, in_flight: int, now: float) -> bool:
        """Whether one more send may leave now (`in_flight`: unanswered ones)."""
        if self.rate is not None:
            return self.tokens(now) >= 1.0 - _EPSILON
        return self.cap is None or in_flight < self.cap

    def tokens(self, now: float) -> float:
        """Whole and partial sends the bucket allows now (paced routes only)."""
        self._refill(now)
        return self._tokens

    def allowance(self, now: float) -> int:
        """How many sends a paced route may start now."""
        return int(self.tokens(now) + _EPSILON) if self.rate is not None else 0

    def took(self, now: float) -> None:
        """One send left."""
        self._last_send = now
        if self.rate is None:
            return
        self._refill(now)
        self._tokens -= 1.0

    def held_back(self, now: float) -> None:
        """The route had more due rows than its bucket let go: the bucket is
        what holds it back, so probe upward (at most one step a probe
        interval). An idle route never calls this, and learns nothing."""
        if self.rate is not None and now >= self._next_probe and self.rate < self._ceiling:
            self._refill(now)
            self.rate = min(self._ceiling, self.rate * (self.fast_growth if self._fast else self.slow_growth))
            self._next_probe = now + (1.0 if self._fast else self.probe_interval)

    def rest(self, now: float) -> bool:
        """End pacing after `idle_after` seconds without a send (back to slow
        start, remembering the rate). Returns whether it ended."""
        if self.rate is None or now - self._last_send < self.idle_after:
            return False
        self._remembered, self.rate = self.rate, None
        self.cap = self.initial_window if self.initial_window < self.window else None
        return True

    def next_send_at(self, now: float) -> float:
        """When a paced route may send again (now or later)."""
        if self.rate is None:
            return now
        missing = 1.0 - self.tokens(now)
        return now if missing <= 0 else now + missing / self.rate

    # -- what the broker answered

    def answered(self, now: float, *, accepted: bool) -> None:
        """A send of this route was answered, other than by a refusal."""
        if self.cap is not None:
            self.cap += 1
            if self.cap >= self.window:
                self.cap = None
        if not accepted:
            return
        second = int(now)
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1][1] += 1
        else:
            self._recent.append([second, 1])
            while self._recent and self._recent[0][0] <= second - self.guess_span:
                self._recent.popleft()

    def refused(self, now: float, *, sent_at: float, text: str) -> bool:
        """The broker refused a send for its rate. Returns whether the rate
        was lowered (False: the refusal belongs to an episode already met)."""
        self.refusals += 1
        if self.rate is not None and sent_at < self._set_at:
            return False
        stated = stated_limit(text)
        if stated is not None:
            self._ceiling = min(self._ceiling, stated.per_second * self.stated_margin)
            if stated.burst is not None:
                self._burst = max(1.0, stated.burst / 2)
        if self.rate is None:
            rate = self._first_guess(now)
        else:
            span = min(self.guess_span, now - self._set_at)
            measured = self._accepted_rate(now, span) if span >= 1.0 else 0.0
            rate = min(self.rate, max(measured, self.rate / 2)) * self.measured_margin
            self._fast = False
        self._set(min(self._ceiling, max(self.min_rate, rate)), now)
        self._tokens = 0.0  # the broker's bucket is empty now
        self.cap = None
        return True

    # -- inside

    def _first_guess(self, now: float) -> float:
        if self._ceiling < math.inf:
            return self._ceiling
        if self._remembered is not None:
            return self._remembered
        return self._accepted_rate(now, self.guess_span)

    def _accepted_rate(self, now: float, span: float) -> float:
        """Sends accepted a second over about the last `span` seconds (from
        the start of the whole second `span` ago)."""
        start = math.floor(now - span)
        accepted = sum(n for s, n in self._recent if s >= start)
        return accepted / max(now - start, 1.0)

    def _set(self, rate: float, now: float) -> None:
        self.rate = rate
        self._stamp = now
        self._set_at = now
        self._next_probe = now + (1.0 if self._fast else self.probe_interval)

    def _refill(self, now: float) -> None:
        rate = self.rate
        if rate is None or now <= self._stamp:
            return
        # Sending evenly below the broker's rate never empties its bucket, so
        # our own burst only needs to spare the loop a wake per token.
        burst = max(1.0, min(self._burst, rate * 0.1))
        self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
