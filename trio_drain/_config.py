"""DrainConfig: the worker's tunables, in seconds as floats."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from ._errors import ConfigError
from ._lifecycle import RetryPolicy, UnknownFate


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ConfigError(
                f"{attribute.name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )

    return check


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _boolean(instance: object, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


@attrs.frozen(kw_only=True)
class DrainConfig:
    """How a `DrainWorker` schedules, retries and bounds its work.

    Attributes:
        max_inflight: the most sends outstanding at once. With `adaptive`
            (the default) this is the upper bound of the window the worker
            sizes itself; without, it is the window. Throughput is at most
            about a window of rows per broker round trip, and a crash may
            resend up to the window it had.
        adaptive: size the window of sends outstanding from what the
            worker measures (round trips, throughput, ``overloaded``
            answers), between a small floor and `max_inflight`: wide
            against a broker far away, narrower where a wider window only
            adds waiting, under what an overloaded broker takes.
            ``False`` holds the window at `max_inflight`.
        batch_size: most rows claimed in one statement. A claim also takes
            at most half of the window, so the window moves in two
            groups: one is recorded and refilled while the other waits
            for its acks.
        poll_interval: longest sleep between looks at the outbox, the
            backstop for rows written by other processes.
        lease: how long a claim holds a row before another worker may take it
            back. Must exceed `ack_timeout`.
        ack_timeout: longest wait for a broker's ack before the send counts
            as a transient `ack_timeout` failure.
        max_attempts: tries before a transient failure becomes `dead`.
        backoff_base: first retry delay; doubles per attempt, with jitter.
        backoff_cap: longest retry delay.
        route_retry: delay before a row whose route was down is looked at again.
        max_age: pending rows older than this go `dead` ("expired") unsent:
            brokers dedupe for 24 hours, so a resend after that could apply twice.
        maintenance_interval: how often expired leases and stale rows are swept.
        shutdown_timeout: how long `trio-drain run` waits, once told to
            stop, for the answers to sends already out before it gives the
            rest back to `pending` and exits (see `DrainWorker.stop`).
        unknown_fate: what becomes of a row whose send may have reached the
            broker but was never answered (no ack in time, the connection
            lost, the worker crashed or stopped): ``"resend"`` it (the
            default; right for a broker that dedupes on client_message_id,
            as the reference broker does), or ``"dead"``: leave it dead
            with last_error ``unknown_fate: <why>`` for an operator to
            check and requeue. Choose ``"dead"`` for a broker that does not
            dedupe (the seed's real broker), where a resend is delivered
            twice if the first send had arrived. After a crash (or a second
            signal) the store cannot tell a row that left from one claimed
            but not yet sent: under ``"dead"`` both go dead for review.
    """

    max_inflight: int = attrs.field(default=1024, validator=_positive_int)
    adaptive: bool = attrs.field(default=True, validator=_boolean)
    batch_size: int = attrs.field(default=128, validator=_positive_int)
    poll_interval: float = attrs.field(default=0.5, validator=_positive)
    lease: float = attrs.field(default=60.0, validator=_positive)
    ack_timeout: float = attrs.field(default=15.0, validator=_positive)
    max_attempts: int = attrs.field(default=25, validator=_positive_int)
    backoff_base: float = attrs.field(default=0.5, validator=_positive)
    backoff_cap: float = attrs.field(default=30.0, validator=_positive)
    route_retry: float = attrs.field(default=0.25, validator=_positive)
    max_age: float = attrs.field(default=23 * 3600.0, validator=_positive)
    maintenance_interval: float = attrs.field(default=5.0, validator=_positive)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive)
    unknown_fate: UnknownFate = attrs.field(default="resend", validator=_one_of("resend", "dead"))

    def __attrs_post_init__(self) -> None:
        if self.lease <= self.ack_timeout:
            raise ConfigError(
                f"lease ({self.lease}s) must be longer than ack_timeout ({self.ack_timeout}s),"
                " or another worker could take a row back while its ack is still awaited"
            )
        if self.backoff_cap < self.backoff_base:
            raise ConfigError("backoff_cap must be at least backoff_base")

    @classmethod
    def seed_schedule(cls, **overrides: Any) -> DrainConfig:
        """The seed daemon's schedule: one send at a time, batches of 32."""
        return cls(**{"max_inflight": 1, "batch_size": 32, "adaptive": False, **overrides})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> DrainConfig:
        """Build from a `[drain]` table, rejecting unknown keys."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown [drain] setting(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base_ms=_ms(self.backoff_base),
            backoff_cap_ms=_ms(self.backoff_cap),
            route_retry_ms=_ms(self.route_retry),
            lease_ms=_ms(self.lease),
            max_age_ms=_ms(self.max_age),
            unknown_fate=self.unknown_fate,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
