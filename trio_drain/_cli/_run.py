"""`trio-drain run`: drain an outbox until SIGINT or SIGTERM, then stop
gracefully within `shutdown_timeout`; a second signal exits at once."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import AsyncExitStack
from typing import Any

import trio

from .._brokers._identity import MeshIdentity
from .._brokers._registry import BrokerRegistry
from .._brokers._websocket import WebSocketBroker
from .._config import DrainConfig
from .._drain._worker import DrainWorker
from .._errors import ConfigError, StoreError, TrioDrainError
from .._outbox import Outbox, open_outbox
from ._args import add_db, existing_db, number
from ._boundary import EXIT_INTERRUPTED, EXIT_RUNTIME
from ._config_file import load_config
from ._logging import log
from ._progress import PROGRESS_EVERY, RunReport

#: How long past `shutdown_timeout` the watchdog lets a stopping `run` live.
_WATCHDOG_GRACE = 2.0

#: Seconds between counts of the outbox for `--metrics`, at the least.
METRICS_REFRESH = 5.0

#: Of `shutdown_timeout`, what is kept for handing back the rows still out.
_HAND_BACK_RESERVE = 0.5


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `run` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    run = commands.add_parser("run", help="drain an outbox until SIGINT/SIGTERM")
    add_db(run)
    run.add_argument("--config", required=True, help="TOML file with [drain] and [[mesh]] tables")
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_metrics_address,
        help="serve Prometheus metrics at http://HOST:PORT/metrics ([::1]:PORT for IPv6;"
        " port 0 picks a free one, and the log says which)",
    )
    run.add_argument(
        "--metrics-refresh",
        metavar="SECONDS",
        type=number(float, "a number of seconds", 0.1),
        default=METRICS_REFRESH,
        help="how often the outbox is counted for the metrics (default"
        f" {METRICS_REFRESH:g}; less often when counting takes more than 5%% of the time)",
    )
    run.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=number(float, "a number of seconds", 0.1),
        default=PROGRESS_EVERY,
        help=f"seconds between progress lines while rows move (default {PROGRESS_EVERY:g})",
    )


def _metrics_address(text: str) -> tuple[str, int]:
    from .._metrics._server import parse_address

    try:
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def cmd_run(args: argparse.Namespace) -> int:
    """Drain `args.db` through the meshes of `args.config` until a signal.

    It handles SIGINT and SIGTERM itself (a graceful stop), so it is not
    wrapped in `interruptible`.

    Args:
        args: The parsed arguments of `run`.

    Returns:
        0 after a graceful stop; 130 if the signal came before draining began.
    """
    config, meshes = load_config(args.config)
    signals = _Signals(config.shutdown_timeout)
    async with trio.open_nursery() as outer:
        await outer.start(signals.watch)  # to the end: a second signal always exits at once
        async with open_outbox(existing_db(args.db)) as outbox:
            stopped = await _drain_until_signal(outbox, config, meshes, signals, args)
        outer.cancel_scope.cancel()
    if not stopped:
        sys.stderr.write("trio-drain: interrupted before draining began\n")
        return EXIT_INTERRUPTED
    return 0


class _Signals:
    """SIGINT and SIGTERM for the whole of `run`: the first asks for a
    graceful stop, a second exits at once (rows still in flight come back
    through their lease)."""

    def __init__(self, shutdown_timeout: float) -> None:
        self.received = trio.Event()
        self.name = ""
        self.shutdown_timeout = shutdown_timeout

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if not self.received.is_set():
                    self.name = signal.Signals(signum).name
                    self.received.set()
                    self._watchdog()
                    continue
                sys.stderr.write(
                    "trio-drain: interrupted again; exiting at once"
                    " (rows in flight come back when their lease ends)\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)

    def _watchdog(self) -> None:
        """Whatever a broker, a disk or a database server does while we
        stop, the process is gone shortly after `shutdown_timeout`: a
        thread, since the Trio loop is what could be stuck."""

        def expire() -> None:
            sys.stderr.write(
                f"trio-drain: not stopped {self.shutdown_timeout + _WATCHDOG_GRACE:g}s after the signal;"
                " exiting (rows in flight come back when their lease ends)\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_RUNTIME)

        timer = threading.Timer(self.shutdown_timeout + _WATCHDOG_GRACE, expire)
        timer.daemon = True
        timer.start()


async def _drain_until_signal(
    outbox: Outbox,
    config: DrainConfig,
    meshes: list[dict[str, Any]],
    signals: _Signals,
    args: argparse.Namespace,
) -> bool:
    """Run the brokers and the worker until a signal; stop within
    `shutdown_timeout`, and say what the run did. Returns False if the
    signal came before the worker started."""
    registry = BrokerRegistry()
    worker = DrainWorker(outbox, registry, config)
    async with AsyncExitStack() as stack:
        # The metrics address is bound first: one in use stops the start.
        metrics_at = await _serve_metrics(stack, outbox, worker, args.metrics, args.metrics_refresh)
        report = await _drain(outbox, config, meshes, signals, registry, worker, metrics_at, args)
    if report is None:
        return False
    counts = None
    with trio.move_on_after(_HAND_BACK_RESERVE / 2):  # what a stop has left
        try:
            counts = await outbox.counts()
        except StoreError:  # the summary says what the worker did all the same
            pass
    log.warning("%s", report.summary(worker.statistics(), counts))
    return True


async def _serve_metrics(
    stack: AsyncExitStack,
    outbox: Outbox,
    worker: DrainWorker,
    address: tuple[str, int] | None,
    refresh: float,
) -> str:
    """Serve the metrics of `worker` at `address`, and keep their snapshot
    fresh, in a nursery of their own that lasts as long as `stack`; returns
    the URL (or "" without `--metrics`)."""
    if address is None:
        return ""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    from .._metrics import MetricsCollector
    from .._metrics._server import serve_metrics

    collector = MetricsCollector(outbox, worker, refresh=refresh)
    metrics = CollectorRegistry()
    metrics.register(collector)
    ProcessCollector(registry=metrics)
    PlatformCollector(registry=metrics)
    GCCollector(registry=metrics)
    serving = await stack.enter_async_context(trio.open_nursery())
    stack.callback(serving.cancel_scope.cancel)  # runs first: the nursery then exits at once
    host, port = await serving.start(serve_metrics, metrics, *address)
    await serving.start(collector.run)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"


async def _drain(
    outbox: Outbox,
    config: DrainConfig,
    meshes: list[dict[str, Any]],
    signals: _Signals,
    registry: BrokerRegistry,
    worker: DrainWorker,
    metrics_at: str,
    args: argparse.Namespace,
) -> RunReport | None:
    """The brokers and the worker, from the start to the signal and the
    graceful stop. Returns None if the signal came before the worker started."""
    brokers: dict[str, tuple[WebSocketBroker, str]] = {}
    async with trio.open_nursery() as nursery:
        worker_done = trio.Event()

        async def run_worker(*, task_status: trio.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            worker_done.set()

        async def connect(m: dict[str, Any]) -> None:
            """One broker's first attempt: refuse to start only if retrying
            cannot mend it; an outage is waited out."""
            identity = MeshIdentity(
                mesh_id=m["mesh_id"], member_id=m["member_id"], secret_key=m["secret_key"]
            )
            broker = WebSocketBroker(m["broker_url"], identity)
            await nursery.start(broker.run)
            if broker.fatal_error is not None:
                raise TrioDrainError(
                    f"cannot start: the broker of mesh {m['slug']} at {m['broker_url']}: {broker.fatal_error}"
                )
            if not broker.is_open():
                log.warning(
                    "the broker of mesh %s at %s is not reachable (%s); draining the other routes"
                    " and reconnecting with backoff",
                    m["slug"],
                    m["broker_url"],
                    broker.last_error,
                )
            registry.set_mesh(m["slug"], broker)
            brokers[m["slug"]] = (broker, m["broker_url"])

        async def start() -> None:
            # Every broker's first attempt at once: one that hangs until its
            # connect timeout delays the start by that much, not by the sum.
            async with trio.open_nursery() as attempts:
                for m in meshes:
                    attempts.start_soon(connect, m)
            await nursery.start(run_worker)
            log.warning(
                "draining %s through %d mesh broker(s), up to %d sends in flight%s",
                outbox.description,
                len(meshes),
                config.max_inflight,
                f"; metrics at {metrics_at}" if metrics_at else "",
            )

        with trio.CancelScope() as starting:
            nursery.start_soon(_cancel_on, signals.received, starting)
            await start()
        if starting.cancelled_caught:
            nursery.cancel_scope.cancel()
            return None
        report = RunReport(outbox, worker, brokers, every=args.progress_interval)
        nursery.start_soon(report.run)
        await signals.received.wait()
        log.warning(
            "received %s; stopping within %gs (again to exit at once)", signals.name, config.shutdown_timeout
        )
        # Graceful: claim nothing more, wait (bounded) for the answers to what
        # is out; whatever is still unanswered then goes back to pending.
        worker.stop()
        with trio.move_on_after(max(config.shutdown_timeout - _HAND_BACK_RESERVE, 0)):
            await worker_done.wait()
        nursery.cancel_scope.cancel()
    return report


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
