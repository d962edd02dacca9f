"""`MetricsCollector`: the Prometheus metrics of section 11 of the spec.

A `prometheus_client` custom collector that reads a snapshot. Its `run`
task, on the Trio thread, takes the snapshot: the worker's counters, its
round-trip histograms and the routes' state every second, and the outbox's
counts in the background as `_sampler` paces them (never a count per
scrape). `collect` runs on whatever thread serves the scrape, reads one
frozen object and touches neither the database nor the worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from .._display import Throttle, quieted
from .._drain import DrainWorker, RouteStatistics
from .._errors import StoreError, TrioDrainError
from .._model import Status
from .._outbox import Outbox
from ._observer import ACCEPT_TO_DONE_BUCKETS, SEND_ACK_BUCKETS, HistogramSnapshot, Observations
from ._sampler import OverviewSampler, Sample

if TYPE_CHECKING:
    from prometheus_client.metrics_core import HistogramMetricFamily, Metric

log = logging.getLogger("trio_drain.metrics")

#: How often the worker's side of the snapshot is taken (seconds).
LIVE_EVERY = 1.0

#: `trio_drain_deliveries_total`'s outcomes, and the route counters each adds up.
OUTCOMES: Mapping[str, tuple[str, ...]] = {
    "acked": ("acked",),
    "duplicate": ("duplicates",),
    "retried": ("retried",),
    "dead": ("dead",),
    "given_back": ("unavailable", "rate_limited"),
}


def route_label(route: str) -> str:
    """A route's name as the metrics label it: the worker's names
    (``mesh:<slug>``, ``session:<first 12 hex>``); the paused-routes
    table's ``session:<pubkey>`` is cut to the same 12 characters."""
    if route.startswith("session:"):
        return route[: len("session:") + 12]
    return route


@attrs.frozen(kw_only=True)
class _Live:
    """The worker's side of a snapshot."""

    in_flight: int
    window: int
    per_route: Mapping[str, RouteStatistics]
    routes_up: Mapping[str, bool]
    send_ack: Mapping[str, HistogramSnapshot]
    accept_to_done: HistogramSnapshot


@attrs.frozen(kw_only=True)
class _Outboxed:
    """The outbox's side of a snapshot."""

    counts: Mapping[str, int] | None
    oldest_pending_age: float
    paused: frozenset[str]


@attrs.frozen
class _Snapshot:
    """What a scrape reads: one reference, swapped whole."""

    live: _Live | None = None
    outbox: _Outboxed | None = None


class MetricsCollector:
    """Prometheus metrics of an outbox and of the worker draining it.

    Register it on any `prometheus_client` registry and run it in a
    nursery; the scrape then reads a snapshot that `run` keeps fresh, and
    never touches the database::

        collector = trio_drain.MetricsCollector(outbox, worker)
        prometheus_client.REGISTRY.register(collector)   # or your own registry
        await nursery.start(collector.run)

    ``trio-drain run --metrics HOST:PORT`` does the same and serves them.
    The names (SPEC section 11):

    - ``trio_drain_outbox_rows{status}``: rows per status, all five, and
      ``trio_drain_outbox_oldest_pending_age_seconds`` (0 with none
      pending): from counts read in the background, every `refresh`
      seconds while that is cheap and less often as the outbox grows
      (a count never takes more than 5% of the time).
    - ``trio_drain_deliveries_total{route,outcome}``: what this worker's
      sends came to: ``acked`` (done; duplicates included), ``duplicate``
      (acks of a send the broker had already), ``retried``, ``dead``,
      ``given_back`` (back to pending with the attempt returned: the route
      was down, rate limited or overloaded).
    - ``trio_drain_send_ack_seconds{route}``: a histogram of send to the
      broker's answer; ``trio_drain_accept_to_done_seconds``: of accept to
      done.
    - ``trio_drain_in_flight``, ``trio_drain_window``: sends outstanding,
      and how many may be.
    - ``trio_drain_route_up{route}`` (1 while the route's broker connection
      is open) and ``trio_drain_route_paused{route}`` (1 while paused in
      the outbox, by any process).

    Without a `worker`, only the outbox's metrics and the paused routes are
    collected. One collector a worker: it observes the worker's answers
    from the moment it is made.

    Args:
        outbox: the outbox to count.
        worker: the worker draining it, if any.
        refresh: how often the outbox counts are read (seconds), at least.
    """

    def __init__(self, outbox: Outbox, worker: DrainWorker | None = None, *, refresh: float = 5.0) -> None:
        if not isinstance(refresh, (int, float)) or not 0 < refresh < math.inf:
            raise TrioDrainError(f"refresh must be a positive number of seconds, got {refresh!r}")
        self.outbox = outbox
        self.worker = worker
        self.refresh = float(refresh)
        self._sampler = OverviewSampler(outbox, interval=self.refresh, routes=False, dead_rows=0)
        self._observations: Observations | None = None
        if worker is not None:
            outcomes = worker._outcomes
            if outcomes.observer is not None:
                raise TrioDrainError("this worker has a metrics collector already")
            self._observations = outcomes.observer = Observations()
        self._snapshot = _Snapshot()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the snapshot fresh until cancelled. `nursery.start` returns
        once the first snapshot (outbox counts included) is taken."""
        started = False
        sample: Sample | None = None
        throttle = Throttle(burst=1, every=300.0)
        while True:
            if trio.current_time() >= self._sampler.next_due():
                try:
                    sample = await self._sampler.refresh()
                except StoreError as exc:  # the outbox's figures stay as they were
                    quiet = throttle("unreadable")
                    if quiet is not None:
                        log.warning("metrics: cannot count the outbox (%s)%s", exc, quieted(quiet))
            outboxed = None
            if sample is not None:
                outboxed = _Outboxed(
                    counts=sample.overview.counts,
                    oldest_pending_age=sample.oldest_pending_age(trio.current_time()) or 0.0,
                    paused=frozenset(route_label(r) for r in sample.overview.paused),
                )
            self._snapshot = _Snapshot(self._take_live(), outboxed)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(min(LIVE_EVERY, self.refresh))

    def _take_live(self) -> _Live | None:
        worker, observations = self.worker, self._observations
        if worker is None or observations is None:
            return None
        stats = worker.statistics()
        registry = worker.registry
        up = {f"mesh:{slug}": broker.is_open() for slug, broker in registry.meshes.items()}
        up.update(
            {route_label(f"session:{key}"): broker.is_open() for key, broker in registry.sessions.items()}
        )
        send_ack, accept_to_done = observations.snapshot()
        return _Live(
            in_flight=stats.in_flight,
            window=stats.window,
            per_route=stats.per_route,
            routes_up=up,
            send_ack=send_ack,
            accept_to_done=accept_to_done,
        )

    # -- what prometheus_client calls, on the thread serving the scrape

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (`prometheus_client` checks
        names with it when the collector is registered)."""
        yield from self._families(_Snapshot())

    def collect(self) -> Iterator[Metric]:
        """The metrics, from the latest snapshot (no I/O)."""
        yield from self._families(self._snapshot)

    def _families(self, snapshot: _Snapshot) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        rows = GaugeMetricFamily(
            "trio_drain_outbox_rows",
            "Rows in the outbox per status (counted in the background).",
            labels=["status"],
        )
        age = GaugeMetricFamily(
            "trio_drain_outbox_oldest_pending_age_seconds",
            "Seconds since the oldest pending row was accepted (0 with none pending).",
        )
        live, outboxed = snapshot.live, snapshot.outbox
        if outboxed is not None:
            if outboxed.counts is not None:
                for status in Status:
                    rows.add_metric([status.value], outboxed.counts.get(status.value, 0))
            age.add_metric([], outboxed.oldest_pending_age)
        yield rows
        yield age

        deliveries = CounterMetricFamily(
            "trio_drain_deliveries",
            "What this worker's sends came to, per route: acked (duplicates included), duplicate,"
            " retried, dead, given_back (attempt returned).",
            labels=["route", "outcome"],
        )
        send_ack = HistogramMetricFamily(
            "trio_drain_send_ack_seconds", "Seconds from a send to the broker's answer.", labels=["route"]
        )
        accept_to_done = HistogramMetricFamily(
            "trio_drain_accept_to_done_seconds", "Seconds from a row's accept to its done."
        )
        in_flight = GaugeMetricFamily("trio_drain_in_flight", "Sends outstanding now.")
        window = GaugeMetricFamily("trio_drain_window", "Sends that may be outstanding at once now.")
        up = GaugeMetricFamily(
            "trio_drain_route_up", "1 while the route's broker connection is open.", labels=["route"]
        )
        paused = GaugeMetricFamily(
            "trio_drain_route_paused", "1 while the route is paused in the outbox.", labels=["route"]
        )
        known: set[str] = set()
        if live is not None:
            known = set(live.routes_up) | set(live.per_route) | set(live.send_ack)
            for route in sorted(known):
                stats = live.per_route.get(route, RouteStatistics())
                for outcome, fields in OUTCOMES.items():
                    deliveries.add_metric([route, outcome], sum(getattr(stats, f) for f in fields))
                _add_histogram(send_ack, [route], live.send_ack.get(route), SEND_ACK_BUCKETS)
            _add_histogram(accept_to_done, [], live.accept_to_done, ACCEPT_TO_DONE_BUCKETS)
            in_flight.add_metric([], live.in_flight)
            window.add_metric([], live.window)
            for route, is_up in sorted(live.routes_up.items()):
                up.add_metric([route], 1 if is_up else 0)
        if outboxed is not None:
            for route in sorted(known | outboxed.paused):
                paused.add_metric([route], 1 if route in outboxed.paused else 0)
        yield from (deliveries, send_ack, accept_to_done, in_flight, window, up, paused)


def _add_histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    found: HistogramSnapshot | None,
    bounds: tuple[float, ...],
) -> None:
    """Add one histogram's samples to `family` (zeros if nothing was observed)."""
    if found is None:
        found = HistogramSnapshot(bounds, (0,) * (len(bounds) + 1), 0.0)
    buckets = [(_le(b), n) for b, n in zip(found.bounds, found.cumulative, strict=False)]
    buckets.append(("+Inf", found.count))
    family.add_metric(labels, buckets, found.sum)


def _le(bound: float) -> str:
    return repr(float(bound))
