"""What the reference broker holds senders to, and the faults it injects on purpose.

The payload limits of both modes, a per-member rate limit (the real
broker's token bucket: a burst, then so many a minute) and `Faults`, the
knobs tests and demos turn to make the broker misbehave.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import attrs

from .._errors import ConfigError

#: The most bytes of decoded ciphertext a send may carry (strict mode).
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: The real broker's limit on ciphertext + nonce + target, in characters.
CLAUDEMESH_MAX_MESSAGE_BYTES = 65_536


@attrs.frozen
class RateLimit:
    """A member may send a burst of `burst`, then `per_minute` a minute."""

    burst: int
    per_minute: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``"BURST/PER_MIN"``, as ``10/60`` (the real broker's default).

        Raises:
            ConfigError: not of that form, or not positive.
        """
        burst, sep, per_minute = text.partition("/")
        try:
            limit = cls(int(burst), float(per_minute))
        except ValueError:
            raise ConfigError(f"rate limit must read BURST/PER_MIN, as 10/60; got {text!r}") from None
        if not sep or limit.burst < 1 or not 0 < limit.per_minute < float("inf"):
            raise ConfigError(f"rate limit must be a positive burst and rate, as 10/60; got {text!r}")
        return limit


class Buckets:
    """Token buckets per key, as the real broker keeps them per member."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._per_second = limit.per_minute / 60
        self._buckets: dict[Any, list[float]] = {}  # key -> [tokens, stamp]

    def take(self, key: Any, now: float) -> bool:
        """Take a token from `key`'s bucket at time `now`; False if it has none."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.limit.burst), now]
        tokens = min(float(self.limit.burst), bucket[0] + (now - bucket[1]) * self._per_second)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True


@attrs.frozen
class AckDelaySchedule:
    """An ack delay that changes while the broker runs: `steps` are
    (seconds since the broker started, the ack delay from then on, in
    seconds), in order of time; before the first step there is none."""

    steps: tuple[tuple[float, float], ...]
    _times: tuple[float, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        times = [at for at, _ in self.steps]
        object.__setattr__(self, "_times", tuple(times))
        if (
            not self.steps
            or times != sorted(times)
            or len(set(times)) != len(times)
            or any(not 0 <= at < float("inf") or not 0 <= delay < float("inf") for at, delay in self.steps)
        ):
            raise ConfigError(
                "an ack delay schedule needs steps at distinct, increasing times, each with a"
                f" finite delay of zero or more; got {self.steps!r}"
            )

    @classmethod
    def parse(cls, text: str) -> AckDelaySchedule:
        """``DELAY_MS@SECONDS,...``, as ``1@0,20@5,1@10``: 1 ms from the start,
        20 ms from 5 s, 1 ms again from 10 s.

        Raises:
            ConfigError: not of that form, or not in order.
        """
        steps = []
        for part in text.split(","):
            delay, sep, at = part.strip().partition("@")
            try:
                steps.append((float(at), float(delay) / 1000))
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(
                    f"an ack delay schedule reads DELAY_MS@SECONDS,..., as 1@0,20@5,1@10; got {text!r}"
                ) from None
        return cls(tuple(steps))

    def delay_at(self, elapsed: float) -> float:
        """The ack delay `elapsed` seconds after the broker started."""
        i = bisect.bisect_right(self._times, elapsed)
        return self.steps[i - 1][1] if i else 0.0


def _schedule(value: str | Iterable[tuple[float, float]] | None) -> tuple[tuple[float, float], ...] | None:
    """A schedule's steps, checked, from its text or its pairs."""
    if value is None:
        return None
    if isinstance(value, str):
        return AckDelaySchedule.parse(value).steps
    return AckDelaySchedule(tuple((float(at), float(delay)) for at, delay in value)).steps


def _capacity(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"capacity must be a whole number of sends (0: no limit), got {value!r}")


@attrs.frozen(kw_only=True)
class Faults:
    """Faults the broker injects, for tests and demos. All off by default.

    Attributes:
        ack_delay: seconds before each ack is sent (sends are handled
            concurrently, so this adds latency, not a throughput cap).
        ack_delay_schedule: an ack delay that changes while the broker
            runs (it replaces `ack_delay`), as (seconds since the broker
            started, the delay from then on in seconds) pairs in order of
            time; given as pairs or as text, ``"1@0,20@5,1@10"`` (1 ms from
            the start, 20 ms from 5 s, 1 ms from 10 s).
        capacity: the most sends of one connection that may wait for
            their ack at once (0: no limit). A send that arrives while
            that many wait is answered at once with a transient error,
            code ``overloaded``.
        drop_ack_rate: probability that a send is accepted but never acked.
        transient_error_rate: probability of a transient error ack.
        disconnect_every: close a connection abruptly after this many sends.
        rate_limit: refuse a member's sends beyond this rate (`rate_limit`).
    """

    ack_delay: float = 0.0
    ack_delay_schedule: tuple[tuple[float, float], ...] | None = attrs.field(
        default=None, converter=_schedule
    )
    capacity: int = attrs.field(default=0, validator=_capacity)
    drop_ack_rate: float = 0.0
    transient_error_rate: float = 0.0
    disconnect_every: int = 0
    rate_limit: RateLimit | None = None
