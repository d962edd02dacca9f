"""The `trio-drain` entry point: the parser made of every command's own, and
the dispatch to a command inside the one error boundary.

Every error a user can cause ends in one line on stderr and exit status 2
(usage, config) or 1 (runtime); never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .._version import __version__
from . import _broker, _demo, _keygen, _outbox, _run, _send
from ._boundary import fail_for, interruptible
from ._logging import setup_logging

#: The commands, in the order `trio-drain --help` lists them.
_COMMANDS = (_demo, _broker, _run, _send, _outbox, _keygen)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then each command's parser.

    Returns:
        The `trio-drain` parser.
    """
    parser = argparse.ArgumentParser(prog="trio-drain", description="Durable outbox delivery to brokers.")
    parser.add_argument("--version", action="version", version=f"trio-drain {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run `trio-drain` with `argv` (default: the process's arguments).

    Args:
        argv: The arguments after the program name.

    Raises:
        SystemExit: Always, with the command's exit status.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "run": _run.cmd_run,
        "broker": _broker.cmd_broker_serve,  # these two stop gracefully on a signal themselves
        "send": interruptible(_send.cmd_send),
        "outbox": interruptible(_outbox.cmd_outbox),
        "demo": interruptible(_demo.cmd_demo),
    }
    try:
        if args.command == "keygen":  # the one command that needs no event loop
            status = _keygen.cmd_keygen(args)
        else:
            status = trio.run(commands[args.command], args)
    except BaseException as exc:  # the one boundary: what a user caused ends in one line
        fail_for(exc)
    raise SystemExit(status)
