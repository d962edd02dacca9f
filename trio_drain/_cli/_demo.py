"""`trio-drain demo`: the whole path on embedded defaults, with a progress bar."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .._brokers._identity import MeshIdentity, generate_secret_key
from .._brokers._registry import BrokerRegistry
from .._brokers._websocket import WebSocketBroker
from .._config import DrainConfig
from .._drain._worker import DrainWorker
from .._errors import TrioDrainError
from .._lifecycle import Completion
from .._model import SendRequest, Status
from .._outbox import open_outbox
from .._reference_broker import serve_broker
from ._args import positive_int
from ._boundary import UsageError

#: Rows a transaction of the accept phase takes.
CHUNK = 5_000
#: The demo's window cap: the worker's own default, as a user's would be.
DEFAULT_WINDOW = DrainConfig().max_inflight


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    demo = commands.add_parser("demo", help="drain N messages to a local reference broker")
    demo.add_argument(
        "--messages", type=positive_int, default=10_000, help="how many messages to send (default 10,000)"
    )
    demo.add_argument(
        "--max-inflight",
        type=positive_int,
        default=DEFAULT_WINDOW,
        help=f"the most sends outstanding at once; the window adapts up to it (default {DEFAULT_WINDOW:,},"
        " the worker's own default)",
    )
    demo.add_argument("--db", help="outbox file to create (default: a temp folder)")


async def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo on a fresh outbox: `args.db`, or one in a temp folder.

    Args:
        args: The parsed arguments of `demo`.

    Returns:
        0 only if every message was delivered.

    Raises:
        UsageError: `args.db` exists.
    """
    db = args.db
    if db is None:
        db = str(Path(tempfile.mkdtemp(prefix="trio-drain-demo-")) / "outbox.db")
    elif os.path.exists(db):  # noqa: ASYNC240 (one stat before anything starts)
        raise UsageError(f"{db} exists; the demo wants a fresh outbox (pick another --db)")
    return await run_demo(
        db=db, messages=args.messages, max_inflight=args.max_inflight, progress=sys.stdout.isatty()
    )


async def run_demo(*, db: str, messages: int, max_inflight: int, progress: bool) -> int:
    """Serve a reference broker on a free loopback port, accept `messages`
    rows into the outbox `db`, drain them and print a summary.

    Args:
        db: The outbox to create.
        messages: How many messages to send.
        max_inflight: The worker's window.
        progress: Whether to show a live progress bar.

    Returns:
        0 only if every row is done, else 1.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_broker(open_mode=True, task_status=task_status)
        )
        identity = MeshIdentity(mesh_id="mesh-demo", member_id="demo", secret_key=generate_secret_key())
        broker = WebSocketBroker(server.url, identity)
        await nursery.start(broker.run)
        if not broker.is_open():
            raise TrioDrainError(f"the demo's own broker did not answer: {broker.last_error}")
        registry = BrokerRegistry()
        registry.set_mesh("demo", broker)

        async with open_outbox(db) as outbox:
            with _bars(console, progress) as bars:
                accepting = bars.add_task("accepting", total=messages)
                accept_started = time.perf_counter()
                for start in range(0, messages, CHUNK):
                    await outbox.accept_many(
                        [
                            SendRequest(
                                mesh="demo",
                                target_spec="#demo",
                                payload=f"message {i}".encode(),
                                client_message_id=f"demo-{i:08d}",
                            )
                            for i in range(start, min(start + CHUNK, messages))
                        ]
                    )
                    bars.update(accepting, completed=min(start + CHUNK, messages))
                accept_seconds = time.perf_counter() - accept_started
                bars.stop_task(accepting)

                finished = trio.Event()
                settled = 0

                def on_completion(c: Completion) -> None:
                    nonlocal settled
                    if c.status is not Status.PENDING:
                        settled += 1
                        if settled >= messages:
                            finished.set()

                worker = DrainWorker(outbox, registry, DrainConfig(max_inflight=max_inflight))
                worker.on_completion = on_completion
                started = time.perf_counter()
                draining = bars.add_task("draining", total=messages)
                await nursery.start(worker.run)
                while not finished.is_set():
                    with trio.move_on_after(0.1):
                        await finished.wait()
                    bars.update(draining, completed=settled)
                seconds = time.perf_counter() - started
                bars.stop_task(draining)
            counts = await outbox.counts()
            stats = worker.statistics()
        nursery.cancel_scope.cancel()

    table = Table(title=f"trio-drain demo: {messages:,} messages, max_inflight {max_inflight}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("delivered (done)", f"{counts['done']:,}")
    table.add_row("duplicates at the broker", f"{server.statistics().duplicates:,}")
    table.add_row("dead", f"{counts['dead']:,}")
    table.add_row(
        "accepted in", f"{accept_seconds:.2f} s ({messages / max(accept_seconds, 1e-9):,.0f} rows/s)"
    )
    table.add_row("drained in", f"{seconds:.2f} s")
    table.add_row("messages/s", f"{messages / max(seconds, 1e-9):,.0f}")
    table.add_row("retried", f"{stats.retried:,}")
    table.add_row("outbox", Text(db))  # a path is not markup
    console.print(table)
    return 0 if counts["done"] == messages else 1


def _bars(console: Any, shown: bool) -> Any:
    """The demo's progress bars (one a phase): description, bar, percent,
    done of all, messages a second, elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Messages a second, as rich estimates the task's speed."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(
                "     - msg/s" if speed is None else f"{speed:>6,.0f} msg/s", style="progress.data.speed"
            )

    return Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not shown,
        transient=False,
    )
