"""How a command ends: its exit status, and the one boundary where an error a
user can cause becomes one line on stderr instead of a traceback.

Exit statuses (SPEC section 8): 2 for usage or config, 1 at run time, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from .._errors import ConfigError, TrioDrainError

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(TrioDrainError):
    """A command-line or config mistake (exit status 2)."""


def interruptible(
    command: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """`command`, cancelled by SIGINT or SIGTERM (which then reads as an
    interrupt: exit 130, one line). Trio's own KeyboardInterrupt can wait a
    long time: a write the database has taken refuses cancellation."""

    async def run(args: argparse.Namespace) -> int:
        interrupted = False
        async with trio.open_nursery() as nursery:

            async def watch(*, task_status: trio.TaskStatus[None]) -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

            await nursery.start(watch)
            status = await command(args)
            nursery.cancel_scope.cancel()
        if interrupted:
            raise KeyboardInterrupt
        return status

    return run


def fail_for(exc: BaseException) -> NoReturn:
    """Exit with one line for an error a user can cause; re-raise anything else.

    A nursery wraps what escapes it in an exception group, so the group's
    leaves are what count: an interrupt anywhere is exit 130; else the
    first error of ours decides the status.
    """
    found = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        _fail("interrupted", EXIT_INTERRUPTED)
    if any(isinstance(leaf, BrokenPipeError) for leaf in found):
        # The reader went away (`| head`): nothing to say, and nowhere to say
        # it; keep the interpreter's own flush at exit quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_RUNTIME)
    for leaf in found:
        if isinstance(leaf, SystemExit):
            raise leaf
        if isinstance(leaf, (UsageError, ConfigError)):
            _fail(str(leaf), EXIT_USAGE)
        if isinstance(leaf, TrioDrainError):
            _fail(str(leaf), EXIT_RUNTIME)
    raise exc


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in `group` and its nested groups, flattened.

    Args:
        group: What a nursery raised.

    Returns:
        Every exception that is not itself a group, in order.
    """
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _fail(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"trio-drain: error: {message}\n")
    raise SystemExit(status)
