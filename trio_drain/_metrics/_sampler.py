"""Reading an outbox's overview again and again without weighing on it.

`Outbox.overview` has a cheap part (the head: oldest pending age, paused
routes, newest dead rows) and two that grow with the outbox (counts per
status, rows per route). The sampler reads each part every `interval`
seconds while it is cheap, and no more than a `budget` share of the time
once it is not: a count that takes 100 ms runs at most every 2 s under the
default 5%. Figures are exact, never estimated; on a large outbox the
costly ones are older, and a `Sample` says how old.
"""

from __future__ import annotations

import math

import attrs
import trio

from .._outbox import Outbox
from .._store._overview import Overview

#: The share of the time each costly part of the overview may take.
DEFAULT_BUDGET = 0.05


@attrs.frozen(kw_only=True)
class Sample:
    """The latest of each part of an outbox's overview.

    Attributes:
        overview: the parts as last read (`counts` and `routes` from their
            own, maybe older, reads).
        read_at: when the head was read (Trio time, seconds).
        counts_at: when the counts were read, or None before the first.
        routes_at: when the rows per route were read, or None.
        delivered_per_second: rows that became done a second between the
            last two counts, or None (fewer than two counts, or done rows
            were pruned in between).
    """

    overview: Overview
    read_at: float
    counts_at: float | None = None
    routes_at: float | None = None
    delivered_per_second: float | None = None

    def oldest_pending_age(self, now: float) -> float | None:
        """The oldest pending row's age at Trio time `now` (seconds), if it
        is still the one the head read saw."""
        age = self.overview.oldest_pending_age
        return None if age is None else age + max(now - self.read_at, 0.0)


class OverviewSampler:
    """Reads `outbox`'s overview part by part, each at most every
    `interval` seconds and at most `budget` of the time.

    Args:
        outbox: the outbox to read.
        interval: the shortest time between two reads of a part (seconds).
        budget: the share of the time a costly part may take.
        routes: whether to read rows per route at all.
        dead_rows: how many of the newest dead rows the head lists.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        interval: float,
        budget: float = DEFAULT_BUDGET,
        routes: bool = True,
        dead_rows: int = 5,
    ) -> None:
        self.outbox = outbox
        self.interval = interval
        self.budget = budget
        self.dead_rows = dead_rows
        self._next = {"head": -math.inf, "counts": -math.inf, "routes": -math.inf if routes else math.inf}
        self.sample: Sample | None = None

    def next_due(self) -> float:
        """When (Trio time) a part is next due."""
        return min(self._next.values())

    async def refresh(self) -> Sample:
        """Read the parts that are due; return the latest of all of them."""
        now = trio.current_time()
        due = [part for part, at in self._next.items() if at <= now]
        sample = self.sample
        for part in due:
            started = trio.current_time()
            found = await self.outbox.overview(
                counts=part == "counts",
                routes=part == "routes",
                dead_rows=self.dead_rows if part == "head" else 0,
            )
            ended = trio.current_time()
            cost = ended - started
            self._next[part] = started + max(self.interval, cost / self.budget)
            sample = self._merged(sample, part, found, ended)
        assert sample is not None  # the head is due at the first call
        self.sample = sample
        return sample

    @staticmethod
    def _merged(sample: Sample | None, part: str, found: Overview, at: float) -> Sample:
        if sample is None:
            sample = Sample(overview=found, read_at=at)
        old = sample.overview
        if part == "head":
            return attrs.evolve(
                sample, overview=attrs.evolve(found, counts=old.counts, routes=old.routes), read_at=at
            )
        if part == "routes":
            return attrs.evolve(sample, overview=attrs.evolve(old, routes=found.routes), routes_at=at)
        rate = None
        if old.counts is not None and found.counts is not None and sample.counts_at is not None:
            delivered = found.counts["done"] - old.counts["done"]
            if delivered >= 0 and at > sample.counts_at:
                rate = delivered / (at - sample.counts_at)
        return attrs.evolve(
            sample,
            overview=attrs.evolve(old, counts=found.counts),
            counts_at=at,
            delivered_per_second=rate,
        )
