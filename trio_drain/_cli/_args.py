"""What the commands accept: argparse types for numbers within bounds, and
the checks on an argument a command makes before it opens anything."""

from __future__ import annotations

import argparse
import getpass
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._model import Status
from .._outbox import parse_target
from ._boundary import UsageError

#: The help text of every `--db`.
DB_HELP = (
    "the outbox: a SQLite file path (or sqlite:///relative, sqlite:////absolute)"
    " or a postgresql://user@host/dbname URL"
)

#: An age: a number of seconds, minutes, hours or days (`90s`, `15m`, `12h`,
#: `7d`, `1.5h`); a bare number is seconds.
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest age taken: a hundred years.
_MAX_AGE = 100 * 365 * 86400


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


def age(text: str) -> float:
    """An argparse type: an age (`90s`, `15m`, `12h`, `7d`; a bare number is
    seconds) as seconds.

    Args:
        text: The argument.

    Returns:
        The age in seconds.
    """
    found = _AGE.fullmatch(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: write a number and a unit, as in 90s, 15m, 12h or 7d"
        )
    seconds = float(found.group(1)) * _UNIT[found.group(2)]
    if not seconds <= _MAX_AGE:
        raise argparse.ArgumentTypeError(f"{text!r} is more than a hundred years")
    return seconds


def status(text: str) -> Status:
    """An argparse type: a row status by name.

    Args:
        text: The argument.

    Returns:
        The status.
    """
    try:
        return Status(text)
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise argparse.ArgumentTypeError(f"{text!r} is not a status (one of {names})") from None


def add_db(parser: argparse.ArgumentParser) -> None:
    """Add the `--db` every command that opens an outbox takes.

    Args:
        parser: The command's parser.
    """
    parser.add_argument("--db", required=True, metavar="PATH|URL", help=DB_HELP)


def add_json(parser: argparse.ArgumentParser) -> None:
    """Add `--json`: the result as JSON on stdout, for a program.

    Args:
        parser: The command's parser.
    """
    parser.add_argument("--json", action="store_true", help="print the result as JSON, for a program")


def operator_name() -> str:
    """Who an operator's action is recorded as by default: the OS user, else
    ``operator``.

    Returns:
        A name.
    """
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name, no passwd entry
        return "operator"
    return name or "operator"


def text_argument(name: str, value: str | None) -> str | None:
    """`value`, if it has a UTF-8 form: an argument the shell passed in
    another encoding arrives with surrogate escapes.

    Args:
        name: The option, for the error (`--mesh`).
        value: The argument, or None.

    Returns:
        `value` unchanged.

    Raises:
        UsageError: `value` is not valid UTF-8 text.
    """
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise UsageError(f"{name} is not valid UTF-8 text") from None
    return value
