"""`trio-drain outbox`: look into an outbox, repair it and steer it (list,
inspect, requeue, drop, prune, stats, pause, resume), for a person or,
under --json, a program.

This module is the command's parser and its dispatch. The actions live in
`_outbox_views` (list, inspect, stats: read only) and `_outbox_actions`
(requeue, drop, prune, pause, resume); `_outbox_rows` says which rows a
name or a filter means.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .._lifecycle import DROPPABLE, REQUEUEABLE
from .._model import Status
from .._outbox import MAX_LIST_LIMIT, Outbox, open_outbox
from . import _outbox_actions, _outbox_views, _output
from ._args import add_db, add_json, age, existing_db, number, status, text_argument
from ._boundary import UsageError


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `outbox` and its actions to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    outbox = commands.add_parser(
        "outbox",
        help="inspect, repair and steer an outbox",
        description="Inspect, repair and steer an outbox. Rows are named by id, by a prefix of"
        " the id that names no other row (as `list` shows them), or by client_message_id.",
    )
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = _action(actions, "list", "rows, newest first, with filters and paging")
    _add_filters(listing, "list only")
    listing.add_argument(
        "--limit",
        type=number(int, "a whole number", 1, MAX_LIST_LIMIT),
        default=50,
        metavar="N",
        help=f"at most N rows (default 50, at most {MAX_LIST_LIMIT:,})",
    )
    listing.add_argument(
        "--before", metavar="ROW", help="only rows accepted before this row (the next page, newest first)"
    )
    listing.add_argument(
        "--after", metavar="ROW", help="only rows accepted after this row (the next page, --oldest-first)"
    )
    listing.add_argument("--oldest-first", action="store_true", help="list in accept order, oldest first")

    inspect = _action(actions, "inspect", "one row, every column")
    inspect.add_argument(
        "row", nargs="?", metavar="ROW", help="a row id, a unique prefix of one, or a client_message_id"
    )
    inspect.add_argument("--id", dest="ids", action="append", default=[], metavar="ID", help=_ID_HELP)
    inspect.add_argument(
        "--client-id", dest="client_ids", action="append", default=[], metavar="ID", help=_CLIENT_ID_HELP
    )
    inspect.add_argument(
        "--full",
        action="store_true",
        help=f"the whole payload and ciphertext (else the first {_output.PAYLOAD_PREVIEW:,} bytes)",
    )

    for name, helptext, allowed in (
        (
            "requeue",
            "abort rows and enqueue fresh copies (by id, or every row matching a filter)",
            REQUEUEABLE,
        ),
        ("drop", "abort pending or dead rows for good (by id, or every row matching a filter)", DROPPABLE),
    ):
        p = _action(actions, name, helptext)
        p.add_argument(
            "rows",
            nargs="*",
            metavar="ROW",
            help="row ids, unique prefixes of them, or client_message_ids; or give a filter instead",
        )
        p.add_argument("--id", dest="ids", action="append", default=[], metavar="ID", help=_ID_HELP)
        p.add_argument(
            "--client-id", dest="client_ids", action="append", default=[], metavar="ID", help=_CLIENT_ID_HELP
        )
        _add_filters(p, name, allowed)
        p.add_argument("--dry-run", action="store_true", help="show what would change, and change nothing")
        _add_by(p, "the rows (aborted_by)")

    prune = _action(actions, "prune", "delete rows that settled long ago (done rows by default)")
    prune.add_argument(
        "--older-than",
        type=age,
        default=7 * 86400.0,
        metavar="AGE",
        help="rows that settled more than AGE ago: 90s, 15m, 12h, 7d (default 7d); a done row by its"
        " delivery, an aborted row by its abort, a dead row by its last attempt's due time",
    )
    prune.add_argument(
        "--status",
        dest="statuses",
        action="extend",
        nargs="+",
        type=status,
        metavar="STATUS",
        help="which rows: done (the default), dead, aborted, or several",
    )

    _action(actions, "stats", "rows per status, and the paused routes")

    for name, helptext in (
        ("pause", "stop every worker claiming a route's rows, until resumed"),
        ("resume", "let the workers claim a paused route's rows again"),
    ):
        p = _action(actions, name, helptext)
        route = p.add_mutually_exclusive_group(required=True)
        route.add_argument(
            "--mesh", metavar="SLUG", help="the route of a mesh: its rows sent without a session"
        )
        route.add_argument(
            "--session", metavar="PUBKEY", help="the route of a session: rows sent with its public key"
        )
        _add_by(p, "the table of paused routes (paused_by)")


_ID_HELP = "a row id, or a unique prefix of one (never a client_message_id); may be repeated"
_CLIENT_ID_HELP = "a client_message_id (never a row id); may be repeated"


def _action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, helptext: str
) -> argparse.ArgumentParser:
    p = actions.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
    add_db(p)
    add_json(p)
    return p


def _add_filters(p: argparse.ArgumentParser, verb: str, allowed: frozenset[Status] | None = None) -> None:
    """The filter options: `verb` says what is done with the rows matched
    (``list only``, ``requeue``); `allowed`, the states a bulk action takes."""
    if allowed is None:
        statuses = ""
    else:
        names = ", ".join(s.value for s in sorted(allowed))
        statuses = f" ({names}); without it, pending and dead rows"
        if Status.INFLIGHT in allowed:
            statuses += " (an inflight row is a worker's: name it)"
    p.add_argument(
        "--status",
        dest="statuses",
        action="extend",
        nargs="+",
        type=status,
        metavar="STATUS",
        help=f"{verb} rows in one of these states{statuses}",
    )
    p.add_argument("--mesh", metavar="SLUG", help=f"{verb} rows of this mesh")
    p.add_argument("--lane", metavar="KEY", help=f"{verb} rows of this ordering lane (ordering_key)")
    p.add_argument(
        "--error", metavar="TEXT", help=f"{verb} rows whose last_error contains TEXT (case-sensitive)"
    )
    p.add_argument(
        "--older-than",
        type=age,
        metavar="AGE",
        help=f"{verb} rows enqueued more than AGE ago: 90s, 15m, 12h, 7d",
    )


def _add_by(p: argparse.ArgumentParser, records: str) -> None:
    p.add_argument(
        "--by",
        default=None,
        metavar="NAME",
        help=f"who is acting, as {records} and the log record it (default: your user name)",
    )


async def cmd_outbox(args: argparse.Namespace) -> int:
    """Run the action `args.action` on the outbox `args.db`, which must exist.

    Args:
        args: The parsed arguments of `outbox`.

    Returns:
        The exit status, 0.
    """
    for name in ("mesh", "lane", "error", "session", "by", "before", "after", "row"):
        text_argument(f"--{name}", getattr(args, name, None))
    for name in ("rows", "ids", "client_ids"):
        for value in getattr(args, name, []):
            text_argument("a row's name", value)
    for name in ("mesh", "lane", "error", "session", "by"):
        if getattr(args, name, None) == "":
            raise UsageError(f"--{name} needs a value that is not empty")
    async with open_outbox(existing_db(args.db)) as outbox:
        result: int = await _ACTIONS[args.action](outbox, args)
        return result


#: Every action, by name.
_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    **_outbox_views.ACTIONS,
    **_outbox_actions.ACTIONS,
}
