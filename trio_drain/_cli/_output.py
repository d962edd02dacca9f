"""How a command prints its result on stdout: one JSON value under --json,
else text made inert (it may quote the outbox or a request)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._display import visible


def console() -> Any:
    """A rich console on stdout that highlights nothing it is not told to.

    Returns:
        A `rich.console.Console` (rich is imported only when output needs it).
    """
    from rich.console import Console

    return Console(stderr=False, highlight=False)


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
