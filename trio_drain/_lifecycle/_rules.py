"""The rules a store applies to many rows at once (claims, sweeps, lease
recovery), as data: judged in Python by `holds`, rendered into SQL by the
stores, and held to one answer by a property test."""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import attrs

from .._model import OutboxRow, Status
from ._transitions import RetryPolicy

#
# Claims, lease recovery and the max_age sweep judge many rows at once, so the
# stores run them as SQL. The rules are written here once, as data: `holds`
# judges a row in Python, and the stores render the same terms into their
# WHERE clauses (`_store._sql`). A property test holds the two to the same
# answer on random rows, on both back ends. Two terms depend on other rows
# (an ordering lane's earlier rows, the paused routes): `holds` judges them
# against a `World`, and the stores keep what they need to judge them in SQL.


class Bound(enum.Enum):
    """A value a rule compares a column with, known only when it is applied."""

    #: The store's now (PostgreSQL: the server's clock).
    NOW = "now"
    #: now - max_age: a pending row enqueued before it has expired.
    AGE_LIMIT = "age_limit"
    #: The attempt cap.
    MAX_ATTEMPTS = "max_attempts"


@attrs.frozen
class Compare:
    """`column op value`; false when the column is null, as in SQL."""

    column: str
    op: Literal["=", "<", "<=", ">="]
    value: Status | Bound


@attrs.frozen
class IsNull:
    """The column is null."""

    column: str


@attrs.frozen
class Either:
    """At least one of the terms holds."""

    terms: tuple[Compare | IsNull, ...]


@attrs.frozen
class FirstInLane:
    """No earlier row of the row's ordering lane (by enqueue time, then id)
    holds it: is pending or inflight, or was aborted in flight and its lease
    has not yet run out (`holds_lane`). A row without a lane is always first.

    The stores keep the answer as a flag on the row (``lane_blocked``): set
    when a row joins a lane that something holds, cleared for the lane's
    next row in the transaction that ends its head's hold (done, dead,
    aborted; a row aborted in flight, when its lease runs out). Judging it
    with a scan of the lane instead would cost a claim
    time in proportion to the lane's depth (`_store/_lanes.py`).
    """


@attrs.frozen
class RouteNotPaused:
    """The row's route (`route_name`) is not paused."""


Term = Compare | IsNull | Either | FirstInLane | RouteNotPaused
#: A rule holds when every one of its terms does.
Rule = tuple[Term, ...]

#: A claim may take the row: pending, due, not past max_age, first of its
#: ordering lane, its route not paused.
CLAIMABLE: Rule = (
    Compare("status", "=", Status.PENDING),
    FirstInLane(),
    Compare("next_attempt_at", "<=", Bound.NOW),
    Compare("enqueued_at", ">=", Bound.AGE_LIMIT),
    RouteNotPaused(),
)
#: Claimable now or once due.
WAITING: Rule = (
    Compare("status", "=", Status.PENDING),
    FirstInLane(),
    Compare("enqueued_at", ">=", Bound.AGE_LIMIT),
    RouteNotPaused(),
)
#: A pending row older than max_age: it must never be sent (swept to dead).
PAST_MAX_AGE: Rule = (
    Compare("status", "=", Status.PENDING),
    Compare("enqueued_at", "<", Bound.AGE_LIMIT),
)
#: An inflight row whose lease ran out, or that never had one (seed rows).
LEASE_RAN_OUT: Rule = (
    Compare("status", "=", Status.INFLIGHT),
    Either((IsNull("lease_expires_at"), Compare("lease_expires_at", "<=", Bound.NOW))),
)
#: A row aborted while inflight in a lane whose lease has run out: its send
#: can no longer be on its way, and its lane's next row may go.
LANE_HOLD_RAN_OUT: Rule = (
    Compare("status", "=", Status.ABORTED),
    Compare("lease_expires_at", "<=", Bound.NOW),
)
#: The row has used every attempt it may.
AT_ATTEMPT_CAP: Rule = (Compare("attempts", ">=", Bound.MAX_ATTEMPTS),)

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
}


#: Lease expiry depends on no policy number.
_NO_POLICY = RetryPolicy()


def bound_value(bound: Bound, *, now: int, policy: RetryPolicy) -> int:
    """What `bound` stands for at `now` under `policy`."""
    if bound is Bound.NOW:
        return now
    if bound is Bound.AGE_LIMIT:
        return now - policy.max_age_ms
    return policy.max_attempts


def route_name(row: object) -> str | None:
    """The name a route is paused by: ``session:<pubkey>`` for a row sent
    through a session, ``mesh:<slug>`` for one sent through its mesh, None
    for a row with neither (it goes to the only mesh broker)."""
    session = getattr(row, "sender_session_pubkey", None)
    if session is not None:
        return f"session:{session}"
    mesh = getattr(row, "mesh", None)
    return None if mesh is None else f"mesh:{mesh}"


class World(Protocol):
    """What the terms that look beyond one row need to know."""

    @property
    def paused(self) -> frozenset[str]:
        """Names of the paused routes (`route_name`)."""

    def first_in_lane(self, row: Any) -> bool:
        """Whether no earlier row of `row`'s lane holds it (`holds_lane`)."""


@attrs.frozen
class Table:
    """A `World` made of every row there is (a model of the table) and the paused routes."""

    rows: Sequence[Any]
    paused: frozenset[str] = frozenset()

    def first_in_lane(self, row: Any) -> bool:
        if row.ordering_key is None:
            return True
        place = (row.enqueued_at, row.id)
        return not any(
            other.ordering_key == row.ordering_key
            and holds_lane(other)
            and (other.enqueued_at, other.id) < place
            for other in self.rows
        )


def holds_lane(row: Any) -> bool:
    """Whether `row` holds its lane: pending or inflight, or aborted while
    inflight with its lease still recorded (its send may be on its way;
    `LANE_HOLD_RAN_OUT` ends the hold)."""
    return row.status in ACTIVE or (row.status is Status.ABORTED and row.lease_expires_at is not None)


#: The states that hold a lane: a row in either is its lane's head or waits behind it.
ACTIVE = frozenset({Status.PENDING, Status.INFLIGHT})


def _term_holds(term: Term, row: Any, now: int, policy: RetryPolicy, world: World | None) -> bool:
    if isinstance(term, (FirstInLane, RouteNotPaused)):
        if world is None:
            raise ValueError(f"{type(term).__name__} needs a World to be judged")
        if isinstance(term, FirstInLane):
            return world.first_in_lane(row)
        return route_name(row) not in world.paused
    if isinstance(term, Either):
        return any(_term_holds(t, row, now, policy, world) for t in term.terms)
    value = getattr(row, term.column)
    if isinstance(term, IsNull):
        return value is None
    if value is None:
        return False
    other = term.value if isinstance(term.value, Status) else bound_value(term.value, now=now, policy=policy)
    return _OPS[term.op](value, other)


def holds(rule: Rule, row: object, *, now: int, policy: RetryPolicy, world: World | None = None) -> bool:
    """Whether `row` (anything with the columns as attributes) meets `rule`
    at `now`. Rules with lane or pause terms need `world`."""
    return all(_term_holds(term, row, now, policy, world) for term in rule)


def is_claimable(row: OutboxRow, *, now: int, policy: RetryPolicy, world: World) -> bool:
    """Whether a claim at `now` may take the row."""
    return holds(CLAIMABLE, row, now=now, policy=policy, world=world)


def is_expired(row: OutboxRow, *, now: int, policy: RetryPolicy) -> bool:
    """A pending row older than max_age must never be sent."""
    return holds(PAST_MAX_AGE, row, now=now, policy=policy)


def lease_is_expired(row: OutboxRow, *, now: int) -> bool:
    """An inflight row whose lease ran out (or that never had one: seed rows)."""
    return holds(LEASE_RAN_OUT, row, now=now, policy=_NO_POLICY)
