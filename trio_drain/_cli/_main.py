"""The `trio-drain` entry point: the parser made of every command's own, and
the dispatch to a command inside the one error boundary.

Every error a user can cause ends in one line on stderr and exit status 2
(usage, config) or 1 (runtime); never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from .._display import visible
from .._version import __version__
from . import _broker, _demo, _keygen, _outbox, _run, _send, _top
from ._boundary import EXIT_USAGE, fail_for, interruptible
from ._logging import setup_logging

#: The commands, in the order `trio-drain --help` lists them.
_COMMANDS = (_demo, _broker, _run, _send, _outbox, _top, _keygen)


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a mistake is one line on stderr (SPEC section
    8), not the usage text and then the error. Every command's parser is
    one too (a subparser takes its parent's class)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("trio-drain").strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"trio-drain: error: {where}{visible(message)} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then each command's parser.

    Returns:
        The `trio-drain` parser.
    """
    parser = Parser(prog="trio-drain", description="Durable outbox delivery to brokers.")
    parser.add_argument("--version", action="version", version=f"trio-drain {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written to stderr (default: warning; an outbox action"
        " logs what it did unless this is error)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text, or as one JSON object a line (default: text)",
    )
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
    if args.log_level != "error":  # an operator's action leaves its line in the log
        logging.getLogger("trio_drain.operator").setLevel(logging.INFO)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "run": _run.cmd_run,
        "broker": _broker.cmd_broker_serve,  # these two stop gracefully on a signal themselves
        "send": interruptible(_send.cmd_send),
        "outbox": interruptible(_outbox.cmd_outbox),
        "demo": interruptible(_demo.cmd_demo),
        "top": _top.cmd_top,  # q, Ctrl-C and SIGTERM quit it, with status 0
    }
    try:
        if args.command == "keygen":  # the one command that needs no event loop
            status = _keygen.cmd_keygen(args)
        else:
            status = trio.run(commands[args.command], args)
    except BaseException as exc:  # the one boundary: what a user caused ends in one line
        fail_for(exc)
    raise SystemExit(status)
