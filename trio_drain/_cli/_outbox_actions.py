"""The `outbox` actions that change the outbox: `requeue` and `drop` (rows
named, or every row a filter matches, with a --dry-run), `prune`, and
`pause` and `resume` of a route.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .._clock import wall_clock_ms
from .._display import visible, when
from .._errors import InvalidTransition
from .._lifecycle import DROPPABLE, REQUEUEABLE
from .._model import OutboxRow, Status
from .._outbox import Outbox
from ._args import operator_name
from ._boundary import UsageError
from ._outbox_rows import filters, named_rows
from ._outbox_views import print_rows
from ._output import emit, print_json

#: How many rows a --dry-run shows of those it would change.
DRY_RUN_SHOWN = 20

_SETTLED = [Status.DONE.value, Status.DEAD.value, Status.ABORTED.value]


async def _requeue(outbox: Outbox, args: argparse.Namespace) -> int:
    return await _change(outbox, args, "requeue", REQUEUEABLE)


async def _drop(outbox: Outbox, args: argparse.Namespace) -> int:
    return await _change(outbox, args, "drop", DROPPABLE)


async def _change(outbox: Outbox, args: argparse.Namespace, action: str, allowed: frozenset[Status]) -> int:
    """`requeue` or `drop` the rows named, or every row a filter matches."""
    named = bool(args.rows or args.ids or args.client_ids)
    given = filters(args)
    if named and (args.statuses or any(v is not None for v in given.values())):
        raise UsageError(f"{action}: give rows or a filter, not both")
    if not named and not args.statuses and all(v is None for v in given.values()):
        raise UsageError(
            f"{action}: name rows, or give a filter (--status, --mesh, --lane, --error, --older-than);"
            " --dry-run shows what a filter takes"
        )
    allowed_names = " or ".join(s.value for s in sorted(allowed))
    by = args.by or operator_name()
    if named:
        rows = await named_rows(outbox, args)
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
        count = await outbox.count(statuses, **given)
        shown = await outbox.list(statuses, limit=DRY_RUN_SHOWN, oldest_first=True, **given)
        return await _dry_run(outbox, args, action, shown, count)
    change = outbox.requeue_matching if action == "requeue" else outbox.drop_matching
    count = await change(statuses, by=by, **given)
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
        await print_rows(outbox, shown)
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


#: The actions that change the outbox, by name.
ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    "requeue": _requeue,
    "drop": _drop,
    "prune": _prune,
    "pause": _pause,
    "resume": _resume,
}
