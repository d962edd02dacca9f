"""What ``trio-drain run`` says at the default log level while it drains: a
line when a mesh's broker goes down or comes back, a progress line every
minute while rows move, and a summary at stop."""

from __future__ import annotations

import math
from collections.abc import Mapping

import trio

from .._brokers._registry import Broker
from .._display import bounded, visible
from .._drain import DrainWorker, WorkerStatistics
from .._errors import StoreError
from .._outbox import Outbox
from .._store._overview import Overview
from ._logging import log

#: Seconds between progress lines (`run --progress-interval`).
PROGRESS_EVERY = 60.0

#: How often the brokers' connections are looked at (seconds).
ROUTE_WATCH_EVERY = 0.5


def duration(seconds: float) -> str:
    """`seconds` for a person: ``850 ms``, ``42 s``, ``4 min 12 s``, ``3 h 5 min``, ``2 d 4 h``."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class RunReport:
    """The lines of one `run`: routes down and back, progress, the summary.

    Args:
        outbox: the outbox drained.
        worker: the worker draining it.
        brokers: each mesh's broker by slug, and its URL.
        every: seconds between progress lines.
    """

    def __init__(
        self,
        outbox: Outbox,
        worker: DrainWorker,
        brokers: Mapping[str, tuple[Broker, str]],
        *,
        every: float = PROGRESS_EVERY,
    ) -> None:
        self.outbox = outbox
        self.worker = worker
        self.brokers = brokers
        self.every = every
        self.started_at = trio.current_time()

    async def run(self) -> None:
        """Watch the routes and report progress until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_routes)
            await self._report_progress()

    async def _watch_routes(self) -> None:
        """A line when a mesh's broker goes down or comes back: its rows wait
        meanwhile (the worker's own lines tell of rows it had to leave)."""
        down_since = {
            slug: trio.current_time() for slug, (broker, _) in self.brokers.items() if not broker.is_open()
        }
        while True:
            await trio.sleep(ROUTE_WATCH_EVERY)
            now = trio.current_time()
            for slug, (broker, url) in self.brokers.items():
                if broker.is_open() and slug in down_since:
                    log.warning(
                        "mesh %s: its broker at %s is back (down %s)",
                        visible(slug),
                        visible(url),
                        duration(now - down_since.pop(slug)),
                    )
                elif not broker.is_open() and slug not in down_since:
                    down_since[slug] = now
                    reason = getattr(broker, "last_error", None)
                    log.warning(
                        "mesh %s: its broker at %s is down%s; its rows wait, reconnecting with backoff",
                        visible(slug),
                        visible(url),
                        f" ({bounded(str(reason), 200)})" if reason else "",
                    )

    async def _report_progress(self) -> None:
        """Every `every` seconds in which rows moved: delivered per second,
        the backlog and the oldest pending row's age."""
        last, last_at = self.worker.statistics(), trio.current_time()
        while True:
            await trio.sleep(self.every)
            now, stats = trio.current_time(), self.worker.statistics()
            moved = {
                name: getattr(stats, name) - getattr(last, name)
                for name in ("acked", "retried", "dead", "given_back")
            }
            if any(moved.values()):
                await self._progress_line(moved, now - last_at)
            last, last_at = stats, now

    async def _progress_line(self, moved: Mapping[str, int], seconds: float) -> None:
        try:
            overview = await self.outbox.overview(counts=True, routes=False, dead_rows=0)
        except StoreError:  # the worker says so itself
            overview = Overview()
        counts = overview.counts
        backlog = "-" if counts is None else f"{counts['pending'] + counts['inflight']:,}"
        age = overview.oldest_pending_age
        extra = "".join(
            f", {moved[name]:,} {word}"
            for name, word in (("retried", "retried"), ("dead", "dead"), ("given_back", "given back"))
            if moved[name]
        )
        log.warning(
            "progress: %s delivered/s over %s (%s delivered%s); backlog %s; oldest pending %s",
            f"{moved['acked'] / max(seconds, 1e-9):,.1f}",
            duration(seconds),
            f"{moved['acked']:,}",
            extra,
            backlog,
            "-" if age is None or counts is None else duration(age),
        )

    def summary(self, stats: WorkerStatistics, counts: Mapping[str, int] | None) -> str:
        """The line `run` ends with: what this run did, and the outbox as it stands."""
        seconds = trio.current_time() - self.started_at
        line = (
            f"stopped after {duration(seconds)}: {stats.acked:,} delivered"
            f" ({stats.acked / max(seconds, 1e-9):,.1f}/s), {stats.duplicates:,} of them duplicates,"
            f" {stats.retried:,} retried, {stats.dead:,} dead, {stats.given_back:,} given back"
        )
        if counts is not None:
            line += "; outbox now " + ", ".join(f"{n:,} {status}" for status, n in counts.items())
        return line
