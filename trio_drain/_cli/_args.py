"""What the commands accept: argparse types for numbers within bounds, and
the checks on an argument a command makes before it opens anything."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._outbox import parse_target
from ._boundary import UsageError


def number(
    kind: type[int] | type[float], what: str, low: float, high: float = math.inf
) -> Callable[[str], Any]:
    """An argparse type: `kind` parsed from text, within [low, high].

    Args:
        kind: `int` or `float`.
        what: The kind of value, for the error (`"a port number"`).
        low: The least value accepted.
        high: The greatest value accepted.

    Returns:
        A function for `add_argument(type=...)`.
    """

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}")
        return value

    return parse


positive_int = number(int, "a whole number", 1)
port = number(int, "a port number", 0, 65535)
rate = number(float, "a number", 0, 1)
seconds = number(float, "a number of seconds", 0)


def existing_db(db: str) -> str:
    """`db`, if it names an outbox that exists: commands that inspect an
    outbox must not create one by mistake.

    Args:
        db: An outbox target, a SQLite path or a PostgreSQL URL.

    Returns:
        `db` unchanged.

    Raises:
        UsageError: `db` is a SQLite file that does not exist.
    """
    kind, location = parse_target(db)
    if kind == "sqlite" and not Path(location).exists():
        raise UsageError(f"no outbox database at {location}")
    return db
