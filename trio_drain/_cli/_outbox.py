"""`trio-drain outbox`: look into an outbox, repair it and steer it (list,
inspect, requeue, drop, prune, stats, pause, resume), for a person or,
under --json, a program.

Rows are named by their id, a prefix of it that names no other row (what
`list` shows), or their client_message_id. A name that fits two rows (a
client id that is another row's id, or a prefix of several ids) is refused
with both rows listed, and --id or --client-id says which is meant: a
command never acts on a row the operator did not mean.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from .._clock import wall_clock_ms
from .._display import visible, when
from .._errors import InvalidTransition, UnknownRow
from .._lifecycle import DROPPABLE, REQUEUEABLE
from .._model import OutboxRow, Status
from .._outbox import MAX_LIST_LIMIT, Outbox, open_outbox
from . import _output
from ._args import add_db, add_json, age, existing_db, number, operator_name, status, text_argument
from ._boundary import UsageError
from ._output import emit, print_json

#: `list` shows ids cut to a prefix of at least this many characters that
#: names no other row.
SHORT_ID = 8
#: The shortest prefix a look-up takes as a row's name.
MIN_PREFIX = 4
#: How many rows a --dry-run shows of those it would change.
DRY_RUN_SHOWN = 20

_SETTLED = [Status.DONE.value, Status.DEAD.value, Status.ABORTED.value]

#: How a name given on the command line is read: as a row id, a prefix of
#: one or a client_message_id (``any``); as a row id or prefix (``--id``);
#: as a client_message_id (``--client-id``).
Kind = Literal["any", "id", "client-id"]


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


# -- naming rows


@attrs.frozen
class _Candidate:
    row: OutboxRow
    how: str


async def find_row(outbox: Outbox, name: str, *, kind: Kind = "any") -> OutboxRow:
    """The row `name` names, under the rule above.

    Args:
        outbox: The outbox.
        name: A row id, a prefix of one, or a client_message_id.
        kind: ``"any"`` of those; ``"id"`` (an id or a prefix of one); or
            ``"client-id"``.

    Returns:
        The one row named.

    Raises:
        UnknownRow: no row has that name.
        UsageError: the name fits several rows (they are listed).
    """
    candidates: list[_Candidate] = []
    if kind in ("any", "id"):
        row = await outbox.get(name)
        if row is not None:
            candidates.append(_Candidate(row, "its id"))
    if kind in ("any", "client-id"):
        row = await outbox.get_by_client_id(name)
        if row is not None:
            candidates.append(_Candidate(row, "its client_message_id"))
    # A whole id is exact; otherwise the name may also be the prefix of ids.
    if kind != "client-id" and not any(c.how == "its id" for c in candidates) and len(name) >= MIN_PREFIX:
        for row in await outbox.get_by_id_prefix(name, limit=5):
            candidates.append(_Candidate(row, "an id prefix"))
    distinct = {c.row.id: c for c in reversed(candidates)}  # keep the first reason a row was found
    if len(distinct) == 1:
        return next(iter(distinct.values())).row
    if not distinct:
        what = {"any": "id, id prefix or client_message_id", "id": "id or id prefix"}.get(
            kind, "client_message_id"
        )
        short = (
            f" (a prefix needs {MIN_PREFIX} characters)"
            if kind != "client-id" and len(name) < MIN_PREFIX
            else ""
        )
        raise UnknownRow(visible(f"no outbox row has the {what} {name!r}{short}"))
    listed = "; ".join(
        f"row {c.row.id} ({c.row.status.value}, client_message_id {c.row.client_message_id!r}) by {c.how}"
        for c in sorted(distinct.values(), key=lambda c: c.row.id)
    )
    if all(c.how == "an id prefix" for c in distinct.values()):
        hint = "give more of the id"
    else:
        hint = "say which with --id or --client-id"
    raise UsageError(visible(f"{name!r} names {len(distinct)} rows: {listed}; {hint}"))


async def _named_rows(outbox: Outbox, args: argparse.Namespace) -> list[OutboxRow]:
    """Every row the arguments name, in the order named, each once."""
    rows: dict[str, OutboxRow] = {}
    named: list[tuple[Kind, list[str]]] = [
        ("any", args.rows),
        ("id", args.ids),
        ("client-id", args.client_ids),
    ]
    for kind, names in named:
        for name in names:
            row = await find_row(outbox, name, kind=kind)
            rows.setdefault(row.id, row)
    return list(rows.values())


# -- the actions


async def _list(outbox: Outbox, args: argparse.Namespace) -> int:
    before = None if args.before is None else await find_row(outbox, args.before)
    after = None if args.after is None else await find_row(outbox, args.after)
    rows = await outbox.list(
        args.statuses,
        limit=args.limit,
        before=before,
        after=after,
        oldest_first=args.oldest_first,
        **_filters(args),
    )
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    await _show_rows(outbox, rows)
    if len(rows) == args.limit:
        short = await outbox.short_ids([rows[-1].id], minimum=SHORT_ID)
        cursor = "--after" if args.oldest_first else "--before"
        print(visible(f"(the next {args.limit}: {cursor} {short[rows[-1].id]})"))
    return 0


async def _inspect(outbox: Outbox, args: argparse.Namespace) -> int:
    kinds: list[tuple[Kind, list[str]]] = [
        ("any", [args.row] if args.row else []),
        ("id", args.ids),
        ("client-id", args.client_ids),
    ]
    named = [(kind, name) for kind, names in kinds for name in names]
    if len(named) != 1:
        raise UsageError("inspect: name one row (ROW, --id or --client-id)")
    kind, name = named[0]
    row = await find_row(outbox, name, kind=kind)
    if args.json:
        print_json(row.to_dict())
        return 0
    paused = await outbox.paused_routes()
    _output.show_row(row, now=wall_clock_ms(), paused=paused, full=args.full)
    return 0


async def _requeue(outbox: Outbox, args: argparse.Namespace) -> int:
    return await _change(outbox, args, "requeue", REQUEUEABLE)


async def _drop(outbox: Outbox, args: argparse.Namespace) -> int:
    return await _change(outbox, args, "drop", DROPPABLE)


async def _change(outbox: Outbox, args: argparse.Namespace, action: str, allowed: frozenset[Status]) -> int:
    """`requeue` or `drop` the rows named, or every row a filter matches."""
    named = bool(args.rows or args.ids or args.client_ids)
    filters = _filters(args)
    if named and (args.statuses or any(v is not None for v in filters.values())):
        raise UsageError(f"{action}: give rows or a filter, not both")
    if not named and not args.statuses and all(v is None for v in filters.values()):
        raise UsageError(
            f"{action}: name rows, or give a filter (--status, --mesh, --lane, --error, --older-than);"
            " --dry-run shows what a filter takes"
        )
    allowed_names = " or ".join(s.value for s in sorted(allowed))
    by = args.by or operator_name()
    if named:
        rows = await _named_rows(outbox, args)
        for row in rows:  # all checked before any is changed
            if row.status not in allowed:
                raise InvalidTransition(
                    visible(
                        f"cannot {action} row {row.id}: it is {row.status.value} ({action} takes"
                        f" {allowed_names} rows); nothing was changed"
                    )
                )
        if args.dry_run:
            return await _dry_run(outbox, args, action, rows, len(rows))
        if action == "requeue":
            successors = [await outbox.requeue(row.id, by=by) for row in rows]
            lines = [
                f"requeued {row.id} as {new.id} (client_message_id {new.client_message_id})"
                for row, new in zip(rows, successors, strict=True)
            ]
        else:
            successors = [await outbox.drop(row.id, by=by) for row in rows]
            lines = [f"dropped {row.id}" for row in rows]
        # One row: the row as it now stands (the successor of a requeued one).
        value = [s.to_dict() for s in successors]
        if args.json:
            print_json(value[0] if len(value) == 1 else value)
        else:
            print("\n".join(visible(line) for line in lines))
        return 0
    statuses = set(args.statuses or allowed - {Status.INFLIGHT})
    refused = sorted(statuses - allowed)
    if refused:
        raise UsageError(f"cannot {action} {' or '.join(refused)} rows ({action} takes {allowed_names} rows)")
    if args.dry_run:
        count = await outbox.count(statuses, **filters)
        shown = await outbox.list(statuses, limit=DRY_RUN_SHOWN, oldest_first=True, **filters)
        return await _dry_run(outbox, args, action, shown, count)
    change = outbox.requeue_matching if action == "requeue" else outbox.drop_matching
    count = await change(statuses, by=by, **filters)
    past = "requeued" if action == "requeue" else "dropped"
    emit(args, {past: count, "by": by}, f"{past} {count:,} row(s) (by {by})")
    return 0


async def _dry_run(
    outbox: Outbox, args: argparse.Namespace, action: str, shown: Sequence[OutboxRow], count: int
) -> int:
    if args.json:
        print_json({"dry_run": True, "action": action, "count": count, "rows": [r.to_dict() for r in shown]})
        return 0
    if shown:
        await _show_rows(outbox, shown)
    more = f"; the first {len(shown)} are shown" if count > len(shown) else ""
    print(f"would {action} {count:,} row(s){more} (dry run: nothing changed)")
    return 0


async def _prune(outbox: Outbox, args: argparse.Namespace) -> int:
    statuses = args.statuses or [Status.DONE]
    refused = sorted({s.value for s in statuses} - set(_SETTLED))
    if refused:
        raise UsageError(f"prune takes done, dead or aborted rows, not {' or '.join(refused)}")
    deleted = await outbox.prune(args.older_than, status=statuses)
    names = ", ".join(sorted({s.value for s in statuses}))
    emit(args, {"deleted": deleted}, f"deleted {deleted:,} row(s) ({names})")
    return 0


async def _stats(outbox: Outbox, args: argparse.Namespace) -> int:
    counts = await outbox.counts()
    paused = await outbox.paused_routes()
    if args.json:
        # The five counts; "paused" only when a route is paused.
        value: dict[str, Any] = dict(counts)
        if paused:
            value["paused"] = {
                r: {"paused_at": at, "paused_by": by} for r, (at, by) in sorted(paused.items())
            }
        print_json(value)
        return 0
    _output.show_stats(counts, paused, now=wall_clock_ms())
    return 0


async def _pause(outbox: Outbox, args: argparse.Namespace) -> int:
    by = args.by or operator_name()
    route = f"mesh:{args.mesh}" if args.mesh is not None else f"session:{args.session}"
    changed = await outbox.pause(mesh=args.mesh, session=args.session, by=by)
    if changed:
        text = f"paused {route}: no worker claims its rows until `outbox resume`"
    else:
        at, who = (await outbox.paused_routes()).get(route, (wall_clock_ms(), "?"))
        text = f"{route} was paused already (since {when(at, wall_clock_ms())}, by {who})"
    emit(args, {"route": route, "paused": True, "changed": changed}, text)
    return 0


async def _resume(outbox: Outbox, args: argparse.Namespace) -> int:
    by = args.by or operator_name()
    route = f"mesh:{args.mesh}" if args.mesh is not None else f"session:{args.session}"
    changed = await outbox.resume(mesh=args.mesh, session=args.session, by=by)
    text = f"resumed {route}" if changed else f"{route} was not paused"
    emit(args, {"route": route, "paused": False, "changed": changed}, text)
    return 0


_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    "list": _list,
    "inspect": _inspect,
    "requeue": _requeue,
    "drop": _drop,
    "prune": _prune,
    "stats": _stats,
    "pause": _pause,
    "resume": _resume,
}


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mesh": args.mesh,
        "lane": args.lane,
        "error": args.error,
        "older_than": args.older_than,
    }


async def _show_rows(outbox: Outbox, rows: Sequence[OutboxRow]) -> None:
    short = await outbox.short_ids([r.id for r in rows], minimum=SHORT_ID)
    paused = frozenset(await outbox.paused())
    _output.show_rows(rows, short_ids=short, paused=paused, now=wall_clock_ms())
