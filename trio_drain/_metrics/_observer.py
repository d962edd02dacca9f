"""What the worker tells the metrics as rows go: each answer's round trip
per route, and each delivered row's time from accept to done, counted into
histogram buckets.

This runs on the worker's hot path, once or twice a row, so it is a bisect
and two additions into plain lists (under a microsecond a row, both
together), not a `prometheus_client.Histogram`, which takes a lock per
observation. The collector's `run`, on the same Trio thread, copies them
into its snapshot every second.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

import attrs

from .._lifecycle import Completion
from .._model import OutboxRow

#: Upper bounds (seconds) of `trio_drain_send_ack_seconds`: from a loopback
#: round trip (under a millisecond) to the worker's ack timeout.
SEND_ACK_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Upper bounds (seconds) of `trio_drain_accept_to_done_seconds`: from a
#: drain keeping up (milliseconds) to a row that waited out an outage of a day.
ACCEPT_TO_DONE_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)


@attrs.frozen
class HistogramSnapshot:
    """A histogram as it stood: `cumulative[i]` observations were at most
    `bounds[i]`, the last entry (for +Inf) is the count of all."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Buckets:
    """A histogram's running counts: one per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last for values above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound is in that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        counts = list(self.counts)
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), self.total)


class Observations:
    """The worker's observer (`_drain._outcomes.DeliveryObserver`): round
    trips per route, and accept-to-done times."""

    __slots__ = ("accept_to_done", "send_ack")

    def __init__(self) -> None:
        self.send_ack: dict[str, Buckets] = {}
        self.accept_to_done = Buckets(ACCEPT_TO_DONE_BUCKETS)

    def answered(self, route_name: str, seconds: float) -> None:
        """The broker answered a send on `route_name` after `seconds`."""
        buckets = self.send_ack.get(route_name)
        if buckets is None:  # once per route
            buckets = self.send_ack[route_name] = Buckets(SEND_ACK_BUCKETS)
        # Buckets.observe, written out: this runs once a row.
        buckets.counts[bisect_left(buckets.bounds, seconds)] += 1
        buckets.total += seconds

    def delivered(self, row: OutboxRow, completion: Completion) -> None:
        """`row` is done, as `completion` wrote it. On PostgreSQL the accept
        time is the server's clock and the done time the worker host's: a
        host a little behind reads as zero, not as a negative time."""
        done_at = completion.delivered_at
        if done_at is not None:
            seconds = (done_at - row.enqueued_at) / 1000
            if seconds < 0:
                seconds = 0.0
            buckets = self.accept_to_done  # Buckets.observe, written out
            buckets.counts[bisect_left(buckets.bounds, seconds)] += 1
            buckets.total += seconds

    def snapshot(self) -> tuple[Mapping[str, HistogramSnapshot], HistogramSnapshot]:
        """Copies of the histograms: per route, and accept to done."""
        return {name: b.snapshot() for name, b in self.send_ack.items()}, self.accept_to_done.snapshot()
