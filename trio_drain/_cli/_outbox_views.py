"""The read-only `outbox` actions: `list`, `inspect` and `stats`.

They change nothing; `list` also lends the actions that change rows its way
of showing them (`print_rows`, for a --dry-run).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .._clock import wall_clock_ms
from .._display import visible
from .._model import OutboxRow
from .._outbox import Outbox
from . import _output
from ._boundary import UsageError
from ._outbox_rows import Kind, filters, find_row
from ._output import print_json

#: `list` shows ids cut to a prefix of at least this many characters that
#: names no other row.
SHORT_ID = 8


async def _list(outbox: Outbox, args: argparse.Namespace) -> int:
    before = None if args.before is None else await find_row(outbox, args.before)
    after = None if args.after is None else await find_row(outbox, args.after)
    rows = await outbox.list(
        args.statuses,
        limit=args.limit,
        before=before,
        after=after,
        oldest_first=args.oldest_first,
        **filters(args),
    )
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    await print_rows(outbox, rows)
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


#: The read-only actions, by name.
ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    "list": _list,
    "inspect": _inspect,
    "stats": _stats,
}


async def print_rows(outbox: Outbox, rows: Sequence[OutboxRow]) -> None:
    """Show `rows` as `list` does: short ids, and their routes marked if paused."""
    short = await outbox.short_ids([r.id for r in rows], minimum=SHORT_ID)
    paused = frozenset(await outbox.paused())
    _output.show_rows(rows, short_ids=short, paused=paused, now=wall_clock_ms())
