"""`trio-drain outbox`: look into an outbox and repair it (list, inspect,
requeue, drop, prune, stats), for a person or, under --json, a program."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .._display import bounded, visible
from .._errors import TrioDrainError
from .._model import OutboxRow, Status
from .._outbox import Outbox, open_outbox
from ._args import existing_db, positive_int, seconds
from ._output import console, emit, print_json

#: `outbox inspect` shows this much of a payload unless --full.
PAYLOAD_PREVIEW = 1024


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `outbox` and its actions to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    outbox = commands.add_parser("outbox", help="inspect and repair an outbox")
    outbox_sub = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in [
        ("list", "rows, newest first"),
        ("inspect", "one row"),
        ("requeue", "abort and enqueue a fresh copy"),
        ("drop", "abort a pending or dead row"),
        ("prune", "delete old done rows"),
        ("stats", "rows per status"),
    ]:
        p = outbox_sub.add_parser(name, help=helptext)
        p.add_argument("--db", required=True)
        p.add_argument("--json", action="store_true")
        if name in ("inspect", "requeue", "drop"):
            p.add_argument("id", help="row id or client_message_id")
        if name == "inspect":
            p.add_argument(
                "--full",
                action="store_true",
                help=f"the whole payload (else the first {PAYLOAD_PREVIEW} bytes)",
            )
        if name == "list":
            p.add_argument("--status", choices=[s.value for s in Status])
            p.add_argument("--limit", type=positive_int, default=50)
        if name == "prune":
            p.add_argument(
                "--older-than", type=seconds, default=7 * 24 * 3600.0, help="seconds (default 7 days)"
            )


async def cmd_outbox(args: argparse.Namespace) -> int:
    """Run the action `args.action` on the outbox `args.db`, which must exist.

    Args:
        args: The parsed arguments of `outbox`.

    Returns:
        The exit status, 0.
    """
    async with open_outbox(existing_db(args.db)) as outbox:
        status: int = await _ACTIONS[args.action](outbox, args)
        return status


async def _find(outbox: Outbox, ident: str) -> OutboxRow:
    row = await outbox.get(ident) or await outbox.get_by_client_id(ident)
    if row is None:
        raise TrioDrainError(f"no outbox row with id or client_message_id {ident!r}")
    return row


async def _list(outbox: Outbox, args: argparse.Namespace) -> int:
    rows = await outbox.list(args.status, limit=args.limit)
    if args.json:
        print_json([r.to_dict() for r in rows])
    else:
        _rows_table(rows)
    return 0


async def _inspect(outbox: Outbox, args: argparse.Namespace) -> int:
    row = await _find(outbox, args.id)
    if args.json:
        print_json(row.to_dict())
        return 0
    for key, value in row.to_dict().items():
        if key == "payload":
            print(f"{key:>22}: {_payload_lines(row.payload, args.full)}")
        elif key != "payload_hex":
            print(f"{key:>22}: {'-' if value is None else visible(str(value))}")
    return 0


async def _requeue(outbox: Outbox, args: argparse.Namespace) -> int:
    successor = await outbox.requeue((await _find(outbox, args.id)).id)
    emit(
        args,
        successor.to_dict(),
        f"requeued as {successor.id} (client_message_id {successor.client_message_id})",
    )
    return 0


async def _drop(outbox: Outbox, args: argparse.Namespace) -> int:
    row = await outbox.drop((await _find(outbox, args.id)).id)
    emit(args, row.to_dict(), f"dropped {row.id}")
    return 0


async def _prune(outbox: Outbox, args: argparse.Namespace) -> int:
    deleted = await outbox.prune(args.older_than)
    emit(args, {"deleted": deleted}, f"deleted {deleted} done row(s)")
    return 0


async def _stats(outbox: Outbox, args: argparse.Namespace) -> int:
    counts = await outbox.counts()
    if args.json:
        print_json(counts)
    else:
        from rich.table import Table

        table = Table("status", "rows")
        for status, n in counts.items():
            table.add_row(status, str(n))
        console().print(table)
    return 0


_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    "list": _list,
    "inspect": _inspect,
    "requeue": _requeue,
    "drop": _drop,
    "prune": _prune,
    "stats": _stats,
}


def _rows_table(rows: Sequence[OutboxRow]) -> None:
    from rich.table import Table
    from rich.text import Text

    def cell(value: str | None, limit: int = 200) -> Text:
        # Text is never parsed as markup; bounded() makes controls visible.
        return Text("-" if value is None else bounded(value, limit))

    table = Table("id", "client_message_id", "status", "attempts", "mesh", "target", "last_error")
    for r in rows:
        table.add_row(
            cell(r.id),
            cell(r.client_message_id),
            cell(r.status.value),
            cell(str(r.attempts)),
            cell(r.mesh),
            cell(r.target_spec),
            cell(r.last_error, 60),
        )
    console().print(table)


def _payload_lines(payload: bytes, full: bool) -> str:
    """A payload for a person: text made inert, or hex if it is not UTF-8;
    cut after PAYLOAD_PREVIEW bytes unless `full`."""
    shown = payload if full else payload[:PAYLOAD_PREVIEW]
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        text = f"<{len(payload):,} bytes, not UTF-8> {shown.hex()}"
    else:  # a cut may split a character: drop its first bytes
        text = visible(shown.decode("utf-8", errors="ignore"))
    if len(shown) < len(payload):
        text += f" … ({len(payload):,} bytes in all; --full shows them)"
    return text
