"""Per-route gates: what holds a route's rows back, and what a claim leaves out.

A route is open, down, in slow start, or paced:

- down (its socket is not open): its rows are not claimed at all until it
  reopens, so an outage costs neither CPU nor attempts;
- in slow start: rows claimed for it are held until answers come back, and
  it takes no more rows while it holds some (else it would sit on the
  window's send slots while other routes wait);
- paced (its broker refused a send for its rate; `_pacing.RoutePacer`: slow
  start, then a token bucket that learns the broker's rate): its rows are
  left out of the common claim and claimed on their own, no more at a time
  than its bucket allows, so pacing costs no churn of rows claimed and
  given back.

Brokers limit a member, not a connection, so the routes of one member (its
mesh socket, its sessions) share one pacer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from .._brokers._pacing import RoutePacer
from .._brokers._registry import BrokerRegistry, Ready, Unavailable
from .._display import visible
from .._model import OutboxRow
from .._store._base import RouteFilter, RouteKey

# A gate's record lives with the deliveries it holds (each names the other);
# the worker's modules take it from here, with the gates.
from ._delivery import Gate as Gate

log = logging.getLogger("trio_drain.worker")

#: Claims up to a number of rows of one route (a paced route's share).
ClaimRoute = Callable[[int, RouteKey], Awaitable[list[OutboxRow]]]


class Gates:
    """The gate of every route a row went out through, and the routes that are down."""

    def __init__(self, *, window: int) -> None:
        #: Gates by route key. A plain dict: the sender looks a row's gate up
        #: here directly, once per row.
        self.by_route: dict[RouteKey, Gate] = {}
        #: Routes that are down, by key, with their names.
        self.blocked: dict[RouteKey, str] = {}
        self._window = window
        self._pacers: dict[object, RoutePacer] = {}

    def add(self, route: Ready) -> Gate:
        """The gate of `route`, made on its first row."""
        key = (route.kind, route.key)
        gate = self.by_route.get(key)
        if gate is None:
            # Brokers limit a member, not a connection: routes of one member
            # (its mesh socket, its sessions) share one pacer.
            member = getattr(route.broker, "rate_limit_key", None) or ("route", key)
            pacer = self._pacers.get(member)
            if pacer is None:
                pacer = self._pacers[member] = RoutePacer(window=self._window)
            gate = self.by_route[key] = Gate(route.name, key, pacer)
        return gate

    def rate(self, name: str) -> float | None:
        """Sends a second the route `name` is paced to (its slowest gate's),
        or None while it is not paced."""
        rates = [g.pacer.rate for g in self.by_route.values() if g.name == name and g.pacer.rate is not None]
        return min(rates) if rates else None

    # -- routes that are down

    def block(self, route: Unavailable) -> None:
        """Leave the rows of `route` alone until it reopens."""
        key = (route.kind, route.key)
        if key not in self.blocked:
            log.warning("route %s is down; leaving its rows until it is back", visible(route.name))
            self.blocked[key] = route.name

    def reopen(self, registry: BrokerRegistry) -> None:
        """Unblock the routes `registry` can send through again."""
        for key in list(self.blocked):
            if not registry.route_unavailable(*key):
                name = self.blocked.pop(key)
                log.warning("route %s is back; resuming its rows", visible(name))

    # -- what a claim takes

    def route_filter(self, only: RouteKey | None = None) -> RouteFilter:
        """What a claim leaves out: routes that are down, and those claimed
        on their own (paced, or holding rows in slow start), unless it
        claims the one route `only`."""
        if only is not None:
            return RouteFilter(only=only)
        own = [key for key, gate in self.by_route.items() if gate.pacer.paced or gate.held]
        return RouteFilter.of([*self.blocked, *own])

    async def claim_shares(
        self, rows: list[OutboxRow], room: int, *, claim: ClaimRoute, poll_interval: float
    ) -> None:
        """Claim into `rows`, up to `room` in all, each paced route's own
        share: no more than its bucket allows (routes sharing a pacer share
        its allowance), and not again before `poll_interval` once a claim
        found it had nothing more due."""
        now = trio.current_time()
        granted: dict[int, int] = {}  # per pacer: what this pass's claims took
        for gate in list(self.by_route.values()):
            if gate.pacer.rest(now):
                log.info(
                    "route %s sent nothing for %.0fs: pacing ends until the broker refuses again",
                    visible(gate.name),
                    gate.pacer.idle_after,
                )
            if len(rows) >= room or not gate.pacer.paced or gate.key in self.blocked:
                continue
            if not gate.maybe_more and now - gate.last_claim < poll_interval:
                continue
            allowance = gate.pacer.allowance(now) - granted.get(id(gate.pacer), 0)
            limit = min(allowance, room - len(rows))
            if limit < 1:
                continue
            found = await claim(limit, gate.key)
            granted[id(gate.pacer)] = granted.get(id(gate.pacer), 0) + len(found)
            gate.maybe_more = len(found) == limit
            gate.last_claim = now
            if gate.maybe_more and limit == allowance:
                gate.pacer.held_back(now)  # more is due than the bucket lets go
            rows.extend(found)

    def next_token_at(self, now: float) -> float:
        """When the first paced route with rows waiting may send again
        (trio time; infinity if none waits)."""
        at = math.inf
        for gate in self.by_route.values():
            if gate.pacer.paced and gate.maybe_more and gate.key not in self.blocked:
                at = min(at, gate.pacer.next_send_at(now))
        return at
