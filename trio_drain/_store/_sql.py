"""What SQLite and PostgreSQL say differently, and the state machine's rules as SQL.

A `Dialect` knows its driver's placeholder and whose clock decides: SQLite
binds the caller's now; PostgreSQL reads the server's. `Dialect.where`
renders a rule of `_lifecycle` (data, not code) into a WHERE clause, so the
stores' bulk statements take their terms from the state machine and a
property test can hold the SQL and `_lifecycle.holds` to the same answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import attrs

from .._lifecycle import Bound, Either, FirstInLane, IsNull, RouteNotPaused, Rule, Term
from .._model import Status
from ._base import RouteFilter, RouteKey

#: The database server's clock in milliseconds since the epoch: what every
#: time-based decision on PostgreSQL reads. `statement_timestamp()` rather
#: than `clock_timestamp()`: it is stable (one value for every row a
#: statement touches, and usable as an index bound, where the volatile
#: clock_timestamp() is neither) and it is taken afresh for each statement
#: (unlike now(), the transaction's start, which in complete_and_claim would
#: be older than the claim it dates). `date_part` (float8) rather than
#: `extract` (numeric since PostgreSQL 14): it is evaluated per row, and
#: numeric arithmetic costs several times more. Not an uncorrelated
#: subquery (an InitPlan, evaluated once): the planner cannot estimate a
#: bound it does not see, and then claims by the due index and a sort.
SERVER_NOW = "floor(date_part('epoch', statement_timestamp()) * 1000)::bigint"


@attrs.frozen
class Dialect:
    """How one database spells what the stores share.

    Attributes:
        mark: the driver's placeholder (``?`` or ``%s``).
        server_now: SQL for the database server's now in milliseconds, or
            None when the caller's clock decides (bound as a parameter).
        pins_indexes: whether a statement names the index it must walk
            (SQLite's planner, with no statistics, often picks another).
    """

    mark: str
    server_now: str | None = None
    pins_indexes: bool = False

    def pin(self, index: str) -> str:
        """The clause that makes a table reference walk `index`, where the dialect has one."""
        return f" INDEXED BY {index}" if self.pins_indexes else ""

    def bound(
        self, bound: Bound, *, now: int, max_age_ms: int = 0, max_attempts: int = 0
    ) -> tuple[str, list[Any]]:
        """SQL and arguments for `bound`; `now` is ignored where the server's clock decides."""
        if bound is Bound.MAX_ATTEMPTS:
            return self.mark, [max_attempts]
        if self.server_now is None:
            return self.mark, [now if bound is Bound.NOW else now - max_age_ms]
        if bound is Bound.NOW:
            return self.server_now, []
        return f"{self.server_now} - {self.mark}", [max_age_ms]

    def where(
        self, rule: Rule, *, now: int = 0, max_age_ms: int = 0, max_attempts: int = 0, table: str = ""
    ) -> tuple[str, list[Any]]:
        """`rule` as SQL (its terms joined by AND) and the arguments it binds, in order.

        Statuses are written as literals so the partial indexes (``WHERE
        status = 'pending'``) match. `table` qualifies the columns. The text
        is rendered once per rule (the claim's is on the hot path); only
        the arguments are worked out each time.
        """
        sql, bounds = self._rendered(rule, table)
        args: list[Any] = []
        for bound in bounds:
            args.extend(self.bound(bound, now=now, max_age_ms=max_age_ms, max_attempts=max_attempts)[1])
        return sql, args

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a few frozen dialects, kept for the process's life)
    def _rendered(self, rule: Rule, table: str) -> tuple[str, tuple[Bound, ...]]:
        """`rule` as SQL, and the bounds whose arguments it takes, in order."""
        bounds: list[Bound] = []
        prefix = f"{table}." if table else ""
        outbox = table or "outbox"

        def term(t: Term) -> str:
            if isinstance(t, Either):
                return "(" + " OR ".join(term(inner) for inner in t.terms) + ")"
            if isinstance(t, FirstInLane):
                return f"{prefix}lane_blocked = 0"
            if isinstance(t, RouteNotPaused):
                return (
                    f"NOT EXISTS (SELECT 1 FROM trio_drain_paused WHERE trio_drain_paused.route ="
                    f" CASE WHEN {outbox}.sender_session_pubkey IS NOT NULL"
                    f" THEN 'session:' || {outbox}.sender_session_pubkey"
                    f" WHEN {outbox}.mesh IS NOT NULL THEN 'mesh:' || {outbox}.mesh END)"
                )
            column = prefix + t.column
            if isinstance(t, IsNull):
                return f"{column} IS NULL"
            if isinstance(t.value, Status):
                return f"{column} {t.op} '{t.value.value}'"
            bounds.append(t.value)
            return f"{column} {t.op} {self.bound(t.value, now=0)[0]}"

        return " AND ".join(term(t) for t in rule), tuple(bounds)

    def routes(self, exclude: RouteFilter) -> tuple[str, list[Any]]:
        """SQL (``AND ...`` terms) leaving out rows of blocked routes, or
        keeping one route alone; mirrors `RouteFilter.blocks`."""
        parts: list[str] = []
        args: list[Any] = []
        if exclude.sessions:
            parts.append(
                f"(sender_session_pubkey IS NULL OR sender_session_pubkey NOT IN ({self.marks(exclude.sessions)}))"
            )
            args.extend(sorted(exclude.sessions))
        if exclude.meshes:
            parts.append(
                f"(sender_session_pubkey IS NOT NULL OR mesh IS NULL OR mesh NOT IN ({self.marks(exclude.meshes)}))"
            )
            args.extend(sorted(exclude.meshes))
        if exclude.null_mesh:
            parts.append("(sender_session_pubkey IS NOT NULL OR mesh IS NOT NULL)")
        if exclude.only is not None:
            only, only_args = self.only_route(exclude.only)
            parts.append(only)
            args.extend(only_args)
        return "".join(" AND " + p for p in parts), args

    def only_route(self, only: RouteKey) -> tuple[str, list[Any]]:
        """SQL keeping the rows of route `only` alone."""
        kind, key = only
        if kind == "session":
            return f"sender_session_pubkey = {self.mark}", [key]
        if kind == "mesh":
            return f"sender_session_pubkey IS NULL AND mesh = {self.mark}", [key]
        return "sender_session_pubkey IS NULL AND mesh IS NULL", []

    def marks(self, values: Sequence[Any] | frozenset[Any]) -> str:
        """As many placeholders as `values`, comma-separated."""
        return ", ".join([self.mark] * len(values))


SQLITE = Dialect(mark="?", pins_indexes=True)
POSTGRES = Dialect(mark="%s", server_now=SERVER_NOW)
