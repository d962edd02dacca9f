"""How a command prints its result on stdout: one JSON value under --json,
else text made inert (it may quote the outbox or a request): rows as a
table or one row's every column, with times in ISO 8601 and their age."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._display import bounded, payload_text, visible, when
from .._lifecycle import route_name
from .._model import OutboxRow, Status

#: `outbox inspect` shows this much of a payload (and a ciphertext) unless --full.
PAYLOAD_PREVIEW = 1024
#: How wide a table is when stdout is not a terminal (a pipe, a file): wide
#: enough that a row stays on one line for grep.
PIPE_WIDTH = 400


def console() -> Any:
    """A rich console on stdout that highlights nothing it is not told to.

    Returns:
        A `rich.console.Console` (rich is imported only when output needs it).
    """
    from rich.console import Console

    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(stderr=False, highlight=False, width=width)


def print_json(value: Any) -> None:
    """Print `value` as one line of JSON.

    Args:
        value: Anything `json` takes; other values are written as `str()`.
    """
    sys.stdout.write(json.dumps(value, indent=None, sort_keys=True, default=str) + "\n")


def emit(args: argparse.Namespace, value: Any, text: str) -> None:
    """Print `value` as JSON under --json, else one line of text (made inert:
    it may quote the outbox or a request).

    Args:
        args: The parsed arguments; `args.json` chooses the form.
        value: The machine-readable result.
        text: The same result for a person.
    """
    if args.json:
        print_json(value)
    else:
        print(visible(text))


def _cell(value: str | None, limit: int = 200) -> Any:
    from rich.text import Text

    # Text is never parsed as markup; bounded() makes controls visible.
    return Text("-" if value is None else bounded(value, limit))


def show_rows(
    rows: Sequence[OutboxRow], *, short_ids: Mapping[str, str], paused: frozenset[str], now: int
) -> None:
    """Rows as a table: ids as their shortest unique prefixes, times with
    their age, a pending row of a paused route marked so.

    Args:
        rows: The rows.
        short_ids: Each row id's shortest unique prefix.
        paused: The paused routes' names.
        now: Now (ms), for the ages.
    """
    from rich.table import Table

    table = Table(
        "id", "status", "attempts", "enqueued", "mesh", "lane", "target", "client_message_id", "last_error"
    )
    table.columns[0].no_wrap = True
    for r in rows:
        state = r.status.value
        if r.status is Status.PENDING and route_name(r) in paused:
            state += ", paused"
        table.add_row(
            _cell(short_ids.get(r.id, r.id)),
            _cell(state),
            _cell(str(r.attempts)),
            _cell(when(r.enqueued_at, now)),
            _cell(r.mesh, 60),
            _cell(r.ordering_key, 60),
            _cell(r.target_spec, 70),
            _cell(r.client_message_id, 80),
            _cell(r.last_error, 80),
        )
    console().print(table)


#: The columns `show_row` shows as times.
_TIMES = ("enqueued_at", "next_attempt_at", "lease_expires_at", "delivered_at", "aborted_at")
#: The order `show_row` shows a row's columns in (any other column after them).
_ORDER = (
    "id",
    "client_message_id",
    "status",
    "attempts",
    "priority",
    "mesh",
    "sender_session_pubkey",
    "route",
    "ordering_key",
    "target_spec",
    "enqueued_at",
    "next_attempt_at",
    "lease_expires_at",
    "lease_token",
    "delivered_at",
    "broker_message_id",
    "last_error",
    "aborted_at",
    "aborted_by",
    "superseded_by",
    "request_fingerprint",
    "nonce",
    "ciphertext",
    "payload",
)


def show_row(row: OutboxRow, *, now: int, paused: Mapping[str, tuple[int, str]], full: bool) -> None:
    """Every column of one row, a line each: times in ISO 8601 with their
    age, None as a dash, the payload as text or hex with its length, the
    route and whether it is paused, the lane.

    Args:
        row: The row.
        now: Now (ms), for the ages.
        paused: The paused routes: name -> (since, by whom).
        full: The whole payload and ciphertext, however long.
    """
    limit = None if full else PAYLOAD_PREVIEW
    route = route_name(row)
    values: dict[str, str] = {}
    if route is None:
        values["route"] = "- (no mesh: the only mesh broker's)"
    elif route in paused:
        at, by = paused[route]
        values["route"] = f"{route} (paused since {when(at, now)}, by {by})"
    else:
        values["route"] = f"{route} (not paused)"
    for key, value in row.to_dict().items():
        if key in _TIMES:
            values[key] = when(value, now, precise=True)
        elif key == "payload":
            values[key] = payload_text(row.payload, limit=limit, more="; --full shows them")
        elif key == "payload_hex":
            continue
        elif key == "ciphertext" and value is not None and limit is not None and len(value) > limit:
            values[key] = f"{len(value):,} characters: {value[:limit]} … (--full shows them all)"
        else:
            values[key] = "-" if value is None else str(value)
    shown = [k for k in _ORDER if k in values] + [k for k in values if k not in _ORDER]
    for key in shown:
        label = "ordering_key (lane)" if key == "ordering_key" else key
        print(f"{label:>22}: {visible(values[key])}")


def show_stats(counts: Mapping[str, int], paused: Mapping[str, tuple[int, str]], *, now: int) -> None:
    """Rows per status, then the paused routes (since when, by whom).

    Args:
        counts: Rows per status.
        paused: The paused routes: name -> (since, by whom).
        now: Now (ms), for the ages.
    """
    from rich.table import Table

    table = Table("status", "rows")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    out = console()
    out.print(table)
    if not paused:
        out.print("paused routes: none")
        return
    routes = Table("paused route", "since", "by")
    for route, (at, by) in sorted(paused.items()):
        routes.add_row(_cell(route), _cell(when(at, now)), _cell(by))
    out.print(routes)
