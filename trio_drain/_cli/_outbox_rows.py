"""Which rows an `outbox` command means: the rows it names, and its filters.

Rows are named by their id, a prefix of it that names no other row (what
`list` shows), or their client_message_id. A name that fits two rows (a
client id that is another row's id, or a prefix of several ids) is refused
with both rows listed, and --id or --client-id says which is meant: a
command never acts on a row the operator did not mean.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

import attrs

from .._display import visible
from .._errors import UnknownRow
from .._model import OutboxRow
from .._outbox import Outbox
from ._boundary import UsageError

#: The shortest prefix a look-up takes as a row's name.
MIN_PREFIX = 4

#: How a name given on the command line is read: as a row id, a prefix of
#: one or a client_message_id (``any``); as a row id or prefix (``--id``);
#: as a client_message_id (``--client-id``).
Kind = Literal["any", "id", "client-id"]


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


async def named_rows(outbox: Outbox, args: argparse.Namespace) -> list[OutboxRow]:
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


def filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filter options given (None where not), as the outbox's keyword arguments."""
    return {
        "mesh": args.mesh,
        "lane": args.lane,
        "error": args.error,
        "older_than": args.older_than,
    }
