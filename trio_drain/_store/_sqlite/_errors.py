"""SQLite's errors in our vocabulary, told apart by result code.

The writer thread and the back end translate every `sqlite3.Error` here,
once, at the boundary: callers see `StoreError` and its kin, never a raw
driver exception.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from ..._errors import CorruptDatabase, StoreError, StoreUnavailable

# What each primary result code means to a caller. Errors are told apart by
# `sqlite_errorname` (its primary part: SQLITE_BUSY_SNAPSHOT is BUSY), never
# by message text, which may quote a table, a column or a value.
_UNAVAILABLE = {
    "BUSY": "the outbox database is busy (another writer holds it)",
    "LOCKED": "the outbox database is busy (another writer holds it)",
    "FULL": "the outbox database cannot grow (disk or page limit full)",
    "READONLY": "the outbox database is read-only",
}
_CORRUPT = frozenset({"CORRUPT", "NOTADB"})


def _primary_code(exc: sqlite3.Error) -> str:
    """BUSY for SQLITE_BUSY or SQLITE_BUSY_SNAPSHOT; "" for an error the
    sqlite3 module raised itself (it has no SQLite result code)."""
    name = getattr(exc, "sqlite_errorname", None)
    if not isinstance(name, str):
        return ""
    return name.removeprefix("SQLITE_").partition("_")[0]


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether `exc` says another connection holds a lock (SQLITE_BUSY)."""
    return _primary_code(exc) == "BUSY"


def is_interrupted(exc: sqlite3.Error) -> bool:
    """Whether `exc` says a statement was interrupted (SQLITE_INTERRUPT)."""
    return _primary_code(exc) == "INTERRUPT"


def translate(exc: sqlite3.Error) -> StoreError:
    """The store error for `exc`: a new exception object on every call (so no
    two callers share one), caused by `exc`."""
    text = str(exc)
    code = _primary_code(exc)
    error: StoreError
    if code in _CORRUPT:
        error = CorruptDatabase(f"the outbox database is corrupt: {text}")
    elif code in _UNAVAILABLE:
        error = StoreUnavailable(f"{_UNAVAILABLE[code]}: {text}")
    else:
        error = StoreError(f"outbox database error: {text}")
    error.__cause__ = exc
    return error


def own_error(exc: BaseException) -> StoreError:
    """What one caller of a failed batch raises: an exception object of its
    own (one instance raised in many tasks would have its traceback and
    context rewritten by each of them)."""
    if isinstance(exc, sqlite3.Error):
        return translate(exc)
    error = StoreError(f"the outbox writer failed: {exc!r}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc) from exc
