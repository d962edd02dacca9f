"""`trio-drain top`: a live view of an outbox, refreshed every `--interval`.

Counts per status, delivered per second, the backlog and the oldest
pending row's age; per route its pending, inflight and dead rows, whether
it is paused, and (given a ``run --metrics`` endpoint) whether its broker
is up; the newest dead rows with their errors. `q` or Ctrl-C quits and
gives the terminal back as it was.

The reads are `Outbox.overview`'s, paced by `_metrics._sampler`: the cheap
ones every refresh, the counts and the rows per route every refresh while
they are cheap and no more than 5% of the time each once the outbox is
large, so that a view left open does not weigh on a drain. Every string
from the outbox or a broker is shown inert (`_display`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import trio

from .._display import bounded, visible
from .._errors import ConfigError, StoreError
from .._metrics._collector import route_label
from .._metrics._sampler import OverviewSampler, Sample
from .._outbox import Outbox, open_outbox
from .._store._overview import RouteRows
from ._args import add_db, existing_db, number
from ._progress import duration

#: How many of the newest dead rows the view lists.
DEAD_SHOWN = 5
#: How many routes the view lists (most pending first).
ROUTES_SHOWN = 12
#: How long a read of a `run --metrics` endpoint may take (seconds).
METRICS_TIMEOUT = 2.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `top` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    top = commands.add_parser(
        "top", help="a live view of an outbox: counts, rate, backlog, routes, dead rows (q quits)"
    )
    add_db(top)
    top.add_argument(
        "--interval",
        metavar="SECONDS",
        type=number(float, "a number of seconds", 0.1),
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_metrics_address,
        help="the address of a `trio-drain run --metrics`, to show whether each route's broker is up",
    )


def _metrics_address(text: str) -> tuple[str, int]:
    from .._metrics._server import parse_address

    try:
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def cmd_top(args: argparse.Namespace) -> int:
    """Show the live view of `args.db` until `q`, Ctrl-C or SIGTERM.

    It handles SIGINT and SIGTERM itself: quitting is the normal way out.

    Args:
        args: The parsed arguments of `top`.

    Returns:
        0.
    """
    async with open_outbox(existing_db(args.db)) as outbox:
        await show(outbox, interval=args.interval, metrics=args.metrics)
    return 0


@attrs.frozen
class Endpoint:
    """What a `run --metrics` endpoint said at the last read.

    Attributes:
        routes_up: each route's broker, up or down, by the metrics' route names.
        in_flight: sends outstanding.
        window: sends that may be outstanding.
        error: why the last read failed, or None.
    """

    routes_up: Mapping[str, bool] = attrs.field(factory=dict)
    in_flight: int | None = None
    window: int | None = None
    error: str | None = None


async def show(outbox: Outbox, *, interval: float, metrics: tuple[str, int] | None = None) -> None:
    """Show the live view of `outbox` until `q`, SIGINT or SIGTERM.

    Args:
        outbox: The outbox to watch.
        interval: Seconds between refreshes.
        metrics: A `run --metrics` endpoint to read routes' up/down from.
    """
    from rich.console import Console

    console = Console(highlight=False)
    sampler = OverviewSampler(outbox, interval=interval, dead_rows=DEAD_SHOWN)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quit_on_signal, nursery.cancel_scope)
        with _keys(nursery.cancel_scope) as key_reader:
            if key_reader is not None:
                nursery.start_soon(key_reader)
            await _refresh_loop(console, outbox, sampler, interval, metrics)


async def _refresh_loop(
    console: Any, outbox: Outbox, sampler: OverviewSampler, interval: float, metrics: tuple[str, int] | None
) -> None:
    from rich.live import Live
    from rich.text import Text

    where = outbox.description
    live = None
    if console.is_terminal:
        live = Live(
            Text(f"trio-drain top: reading {visible(where)} ..."),
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
    with live if live is not None else contextlib.nullcontext():
        sample, problem = None, None
        while True:
            started = trio.current_time()
            try:
                sample, problem = await sampler.refresh(), None
            except StoreError as exc:  # shown, and tried again at the next refresh
                problem = str(exc)
            endpoint = await read_endpoint(metrics) if metrics is not None else None
            if sample is None:
                view: Any = Text(
                    f"trio-drain top: cannot read {visible(where)}: {bounded(problem or '', 300)}"
                )
            else:
                view = render(
                    sample,
                    where=where,
                    interval=interval,
                    endpoint=endpoint,
                    now=trio.current_time(),
                    problem=problem,
                )
            if live is not None:
                live.update(view, refresh=True)
            else:  # not a terminal: a frame at a time
                console.print(view)
            await trio.sleep_until(started + interval)


async def _quit_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


@contextlib.contextmanager
def _keys(scope: trio.CancelScope) -> Iterator[Any]:
    """Read keys from a terminal on stdin (no echo, no line buffering)
    until `q`, which cancels `scope`; the terminal's settings come back on
    exit. Yields the reading task, or None when stdin is not a terminal."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # Ctrl-C still signals

    async def read_keys() -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            typed = os.read(fd, 64)
            if not typed or b"q" in typed.lower():
                scope.cancel()
                return

    try:
        yield read_keys
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def read_endpoint(address: tuple[str, int]) -> Endpoint:
    """Read routes' up/down, the sends in flight and the window from a
    `run --metrics` endpoint (in a thread; `METRICS_TIMEOUT` at most).

    Args:
        address: Its host and port.

    Returns:
        What it said, or why it could not be read.
    """
    import urllib.error
    import urllib.request

    host, port = address
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as answer:
            return str(answer.read(4 * 1024 * 1024).decode("utf-8", "replace"))

    try:
        text = await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return Endpoint(error=str(getattr(exc, "reason", exc)))
    return parse_endpoint(text)


def parse_endpoint(text: str) -> Endpoint:
    """The parts of a metrics page `top` shows.

    Args:
        text: Prometheus text, as `run --metrics` serves it.

    Returns:
        Routes up or down, in flight and window.
    """
    from prometheus_client.parser import text_string_to_metric_families

    up: dict[str, bool] = {}
    gauges: dict[str, int] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "trio_drain_route_up" and "route" in s.labels:
                    up[s.labels["route"]] = s.value == 1
                elif s.name in ("trio_drain_in_flight", "trio_drain_window"):
                    gauges[s.name] = int(s.value)
    except ValueError as exc:
        return Endpoint(error=f"not a metrics page: {exc}")
    return Endpoint(up, gauges.get("trio_drain_in_flight"), gauges.get("trio_drain_window"))


# -- the view


def render(
    sample: Sample,
    *,
    where: str,
    interval: float,
    endpoint: Endpoint | None = None,
    now: float,
    problem: str | None = None,
) -> Any:
    """The view of one refresh, as a rich renderable.

    Args:
        sample: The outbox's overview as last read.
        where: The outbox, as `Outbox.description` names it.
        interval: Seconds between refreshes.
        endpoint: What a `run --metrics` endpoint said, if one was given.
        now: Trio time now (for the ages of the reads).
        problem: why the last read of the outbox failed, if it did.

    Returns:
        A `rich.console.Group`.
    """
    from rich.console import Group
    from rich.text import Text

    title = Text()
    title.append("trio-drain top", style="bold")
    title.append(f"  {bounded(where, 200)}  every {interval:g} s  ")
    title.append("q quits", style="dim")
    parts: list[Any] = [title]
    if problem is not None:
        parts.append(Text(f"cannot read the outbox now: {bounded(problem, 300)}", style="red"))
    parts += [_totals(sample, now), _routes(sample, endpoint, interval, now)]
    if endpoint is not None and endpoint.error is not None:
        parts.append(Text(f"metrics endpoint: {bounded(endpoint.error, 200)}", style="yellow"))
    parts.append(_dead(sample))
    return Group(*parts)


def _totals(sample: Sample, now: float) -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table

    counts = sample.overview.counts
    rows = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    flow = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    statuses = ("pending", "inflight", "done", "dead", "aborted")
    for name in statuses:
        rows.add_column(name, justify="right", min_width=9)
    for name in ("delivered/s", "backlog", "oldest pending"):
        flow.add_column(name, justify="right", min_width=12)
    rate = sample.delivered_per_second
    age = sample.oldest_pending_age(now)
    if counts is None:
        rows.add_row(*["-"] * len(statuses))
        backlog = "-"
    else:
        rows.add_row(*[f"{counts[s]:,}" for s in statuses])
        backlog = f"{counts['pending'] + counts['inflight']:,}"
    flow.add_row("-" if rate is None else f"{rate:,.0f}", backlog, "-" if age is None else duration(age))
    if sample.counts_at is not None and now - sample.counts_at > 2 * max(now - sample.read_at, 1.0):
        flow.caption = f"counted {duration(now - sample.counts_at)} ago (counting a large outbox is paced)"
    return Group(rows, flow)


def _routes(sample: Sample, endpoint: Endpoint | None, interval: float, now: float) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    overview = sample.overview
    routes: dict[str, RouteRows] = {r.route: r for r in overview.routes or ()}
    for name in overview.paused:
        routes.setdefault(name, RouteRows(route=name))
    up: dict[str, bool] = {}
    if endpoint is not None:
        labelled = {route_label(name): name for name in routes}
        for label, is_up in endpoint.routes_up.items():
            name = labelled.get(label, label)
            routes.setdefault(name, RouteRows(route=name))
            up[name] = is_up
    table = Table(title="routes", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("route")
    for name in ("pending", "inflight", "dead"):
        table.add_column(name, justify="right")
    table.add_column("paused")
    if up:
        table.add_column("broker")
    shown = sorted(routes.values(), key=lambda r: (-r.pending, -r.inflight, -r.dead, r.route))
    for r in shown[:ROUTES_SHOWN]:
        cells: list[Any] = [
            Text(_route_name(r.route)),
            f"{r.pending:,}",
            f"{r.inflight:,}",
            f"{r.dead:,}",
            Text("paused", style="yellow") if r.route in overview.paused else "",
        ]
        if up:
            state = up.get(r.route)
            cells.append(
                "" if state is None else Text("up", style="green") if state else Text("down", style="red")
            )
        table.add_row(*cells)
    notes = []
    if len(shown) > ROUTES_SHOWN:
        notes.append(f"and {len(shown) - ROUTES_SHOWN} more route(s)")
    if overview.routes is None:
        notes.append("counting rows per route ...")
    elif sample.routes_at is not None and now - sample.routes_at > 2 * interval:
        notes.append(f"counted {duration(now - sample.routes_at)} ago")
    if endpoint is not None and endpoint.window is not None:
        notes.append(f"in flight {endpoint.in_flight or 0:,} of a window of {endpoint.window:,}")
    if not shown:
        notes.append("no rows waiting")
    table.caption = "; ".join(notes) or None
    return table


def _route_name(route: str) -> str:
    if route.startswith("session:") and len(route) > len("session:") + 12:
        return visible(route[: len("session:") + 12]) + "…"
    return bounded(route, 48)


def _dead(sample: Sample) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title="newest dead rows", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    table.add_column("id", no_wrap=True)
    table.add_column("client id", max_width=24, no_wrap=True, overflow="ellipsis")
    table.add_column("route", max_width=24, no_wrap=True, overflow="ellipsis")
    table.add_column("tries", justify="right")
    table.add_column("error", ratio=1, overflow="fold")
    for row in sample.overview.newest_dead:
        table.add_row(
            Text(visible(row.id)),
            Text(bounded(row.client_message_id, 64)),
            Text(_route_name(row.route)),
            str(row.attempts),
            Text(bounded(row.last_error or "-", 300)),
        )
    if not sample.overview.newest_dead:
        table.caption = "none"
    return table
