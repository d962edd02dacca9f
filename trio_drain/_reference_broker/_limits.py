"""What the reference broker holds senders to, and the faults it injects on purpose.

The payload limits of both modes, a per-member rate limit (the real
broker's token bucket: a burst, then so many a minute) and `Faults`, the
knobs tests and demos turn to make the broker misbehave.
"""

from __future__ import annotations

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


@attrs.frozen(kw_only=True)
class Faults:
    """Faults the broker injects, for tests and demos. All off by default.

    Attributes:
        ack_delay: seconds before each ack is sent (sends are handled
            concurrently, so this adds latency, not a throughput cap).
        drop_ack_rate: probability that a send is accepted but never acked.
        transient_error_rate: probability of a transient error ack.
        disconnect_every: close a connection abruptly after this many sends.
        rate_limit: refuse a member's sends beyond this rate (`rate_limit`).
    """

    ack_delay: float = 0.0
    drop_ack_rate: float = 0.0
    transient_error_rate: float = 0.0
    disconnect_every: int = 0
    rate_limit: RateLimit | None = None
