"""The worker's counters, and the frozen snapshots `DrainWorker.statistics` returns.

Counting costs a dict increment or two per event, no object per row. A
snapshot copies the counts into frozen attrs objects (trio's convention for
`statistics()`), so a caller may keep one, compare it with a later one, and
never see it change: not its counters, and not its table of routes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, NoReturn

import attrs


@attrs.frozen(kw_only=True)
class RouteStatistics:
    """Counters of one route (a mesh or a session connection)."""

    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    retried: int = 0
    dead: int = 0
    unavailable: int = 0
    rate_limited: int = 0
    #: Sends a second the route is paced to, or None while it is not paced.
    rate: float | None = None


class _RouteTable(dict[str, RouteStatistics]):
    """A snapshot's routes by name: a dict that refuses to change.

    A dict rather than a read-only view, so that `attrs.asdict`, pickling
    and copying treat a snapshot as they always did.
    """

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a statistics snapshot is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self) -> tuple[type[_RouteTable], tuple[dict[str, RouteStatistics]]]:
        return (_RouteTable, (dict(self),))


def _read_only(routes: Mapping[str, RouteStatistics]) -> Mapping[str, RouteStatistics]:
    # A copy: nor can the caller's dict change what the snapshot says.
    return _RouteTable(routes)


@attrs.frozen(kw_only=True)
class WorkerStatistics:
    """A snapshot of a worker's counters (since it was created).

    Attributes:
        claimed: rows claimed from the outbox.
        sent: sends handed to a broker.
        acked: rows that reached `done` (duplicates included).
        duplicates: acks the broker marked as duplicates of an earlier send.
        retried: transient failures scheduled for another try.
        dead: rows this worker moved to `dead`.
        given_back: claims returned with their attempt (route down, rate
            limited, stopping).
        rate_limited: sends the broker refused for its rate or its load.
        stale: completions that found their lease taken over (changed nothing).
        in_flight: sends outstanding right now.
        window: how many sends may be outstanding at once right now.
        blocked_routes: routes whose rows are left alone until they reopen.
        per_route: the same counters per route name, read-only.
    """

    claimed: int
    sent: int
    acked: int
    duplicates: int
    retried: int
    dead: int
    given_back: int
    rate_limited: int
    stale: int
    in_flight: int
    window: int
    blocked_routes: tuple[str, ...]
    per_route: Mapping[str, RouteStatistics] = attrs.field(converter=_read_only)


#: The events counted per route (every RouteStatistics field but `rate`).
RouteField = Literal["sent", "acked", "duplicates", "retried", "dead", "unavailable", "rate_limited"]
_ROUTE_FIELDS = tuple(a.name for a in attrs.fields(RouteStatistics) if a.name != "rate")
# The worker-wide counters: every int field of WorkerStatistics but the live ones.
_WORKER_COUNTERS = tuple(
    a.name
    for a in attrs.fields(WorkerStatistics)
    if a.type in (int, "int") and a.name not in ("in_flight", "window")
)


class Counters:
    """A worker's running counts: worker-wide, and per route name."""

    __slots__ = ("per_route", "totals")

    def __init__(self) -> None:
        #: Worker-wide counts by WorkerStatistics field (`in_flight` aside:
        #: it is read live). Events of the worker alone (`claimed`,
        #: `given_back`, `stale`) are added here directly.
        self.totals: dict[str, int] = dict.fromkeys(_WORKER_COUNTERS, 0)
        #: Per route name, counts by RouteStatistics field.
        self.per_route: dict[str, dict[str, int]] = {}

    def count(self, field: RouteField, route_name: str) -> None:
        """Count one `field` event on the route, and in the worker's totals
        when the worker counts that event too."""
        if field in self.totals:
            self.totals[field] += 1
        per = self.per_route.get(route_name)
        if per is None:  # once per route, not once per row
            per = self.per_route[route_name] = dict.fromkeys(_ROUTE_FIELDS, 0)
        per[field] += 1

    def snapshot(
        self,
        *,
        in_flight: int,
        window: int,
        blocked_routes: tuple[str, ...],
        rate: Callable[[str], float | None],
    ) -> WorkerStatistics:
        """The counts now, frozen, with the live figures the caller reads.

        Args:
            in_flight: sends outstanding right now.
            window: sends that may be outstanding at once.
            blocked_routes: names of the routes that are down.
            rate: a route's paced rate by name (None while it is not paced).

        Returns:
            A snapshot that never changes.
        """
        return WorkerStatistics(
            **self.totals,
            in_flight=in_flight,
            window=window,
            blocked_routes=blocked_routes,
            per_route={name: RouteStatistics(**c, rate=rate(name)) for name, c in self.per_route.items()},
        )
