"""Where a claimed row goes next: every transition out of ``inflight``, and the
operator's requeue and drop, as pure functions returning the new state."""

from __future__ import annotations

from typing import Literal

import attrs

from .._errors import InvalidTransition
from .._model import OutboxRow, Status

#: last_error of rows swept to dead by age.
EXPIRED = "expired"
#: last_error of rows whose lease expired and were put back.
LEASE_EXPIRED = "lease_expired"
#: last_error of rows whose lease expired after their last allowed attempt:
#: lease expiry counts as a transient failure, so the cap applies.
LEASE_EXPIRED_AT_CAP = f"max_attempts: {LEASE_EXPIRED}"
#: last_error of rows given back because their route was not open.
ROUTE_UNAVAILABLE = "route_unavailable"
#: last_error of rows handed back when the worker stopped.
WORKER_STOPPED = "worker_stopped"
#: ... and of rows whose last allowed attempt may have left when it stopped.
WORKER_STOPPED_AT_CAP = f"max_attempts: {WORKER_STOPPED}"

#: Prefix of last_error for rows sent to dead because their fate at the
#: broker is unknown and the policy says not to resend them.
UNKNOWN_FATE = "unknown_fate"
#: ... the lease ran out: the worker that held the row crashed or hung.
UNKNOWN_FATE_LEASE = f"{UNKNOWN_FATE}: {LEASE_EXPIRED}"

#: What to do with a row whose send may have reached the broker but was
#: never answered: "resend" it (right for a broker that dedupes), or send it
#: to "dead" for an operator to review (a broker that does not dedupe would
#: deliver a resend twice).
UnknownFate = Literal["resend", "dead"]

REQUEUEABLE = frozenset({Status.PENDING, Status.INFLIGHT, Status.DEAD})
#: Where a lane's head goes when it lets the next row of its lane go.
LEAVES_LANE = frozenset({Status.DONE, Status.DEAD, Status.ABORTED})
DROPPABLE = frozenset({Status.PENDING, Status.DEAD})


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """The numbers the state machine needs, in integer milliseconds."""

    max_attempts: int = 25
    backoff_base_ms: int = 500
    backoff_cap_ms: int = 30_000
    route_retry_ms: int = 250
    lease_ms: int = 60_000
    max_age_ms: int = 23 * 3600 * 1000
    unknown_fate: UnknownFate = "resend"


def backoff_ms(attempts: int, *, base_ms: int, cap_ms: int, jitter: float) -> int:
    """Delay before the next try after `attempts` failed tries.

    Exponential in `attempts` (base, 2 base, 4 base, ...) with "equal
    jitter": a uniformly random point in the upper half of the step, so
    retries of rows that failed together spread out but never shrink below
    half the step. Never above `cap_ms`.

    Args:
        attempts: tries made so far (at least 1 after a claim).
        jitter: a number in [0, 1], normally `random.random()`.
    """
    exponent = min(max(attempts - 1, 0), 40)
    step = min(cap_ms, base_ms * (1 << exponent))
    half = step / 2
    return max(1, min(cap_ms, int(half + half * jitter)))


@attrs.frozen(kw_only=True)
class Completion:
    """A transition out of ``inflight``, applied only under `lease_token`.

    A store writes every field to the row with id `row_id`, clears the lease,
    and does so only while the row is still ``inflight`` under `lease_token`;
    otherwise it changes nothing and reports the completion as stale.
    """

    row_id: str
    lease_token: str
    status: Status
    attempts: int
    next_attempt_at: int
    last_error: str | None = None
    delivered_at: int | None = None
    broker_message_id: str | None = None
    #: For a row put back to pending: how long after the store's own now it
    #: is due. A store that keeps time by another clock than the worker's
    #: (PostgreSQL: the server's) counts from its now, so a worker host's
    #: clock being off moves no retry; None: `next_attempt_at` as it stands.
    retry_in_ms: int | None = None
    #: The row's ordering lane: a completion that takes the lane's head out
    #: of pending and inflight lets the next row of the lane go.
    ordering_key: str | None = None
    #: The row's enqueue time: with `row_id`, its place in its lane, from
    #: which the store finds the next row.
    enqueued_at: int = 0


def releases_lane(completion: Completion) -> bool:
    """Whether the completion takes a lane's head out of pending and
    inflight, so that the next row of its lane may go."""
    return completion.ordering_key is not None and completion.status in LEAVES_LANE


def _dead(row: OutboxRow, error: str) -> Completion:
    """The claimed row goes dead with `error`, its attempts and due time as they stand."""
    return Completion(
        row_id=row.id,
        lease_token=_require_inflight(row),
        status=Status.DEAD,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=error,
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


def _require_inflight(row: OutboxRow) -> str:
    if row.status is not Status.INFLIGHT or row.lease_token is None:
        raise ValueError(f"row {row.id} is not a claimed row")
    return row.lease_token


def on_ack(row: OutboxRow, *, broker_message_id: str, now: int) -> Completion:
    """The broker accepted (or deduped) the row."""
    return Completion(
        row_id=row.id,
        lease_token=_require_inflight(row),
        status=Status.DONE,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        delivered_at=now,
        broker_message_id=broker_message_id,
        last_error=None,
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


def on_error(
    row: OutboxRow, *, error: str, permanent: bool, now: int, policy: RetryPolicy, jitter: float
) -> Completion:
    """The send failed: dead if permanent or at the attempt cap, else back off."""
    token = _require_inflight(row)
    if permanent:
        return _dead(row, error)
    if row.attempts >= policy.max_attempts:
        return _dead(row, f"max_attempts: {error}")
    delay = backoff_ms(
        row.attempts, base_ms=policy.backoff_base_ms, cap_ms=policy.backoff_cap_ms, jitter=jitter
    )
    return Completion(
        row_id=row.id,
        lease_token=token,
        status=Status.PENDING,
        attempts=row.attempts,
        next_attempt_at=now + delay,
        last_error=error,
        retry_in_ms=delay,
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


def on_route_unavailable(row: OutboxRow, *, now: int, policy: RetryPolicy) -> Completion:
    """The route's socket is not open: nothing left, so the attempt is given back.

    An outage never kills a message (only `max_age` does).
    """
    return Completion(
        row_id=row.id,
        lease_token=_require_inflight(row),
        status=Status.PENDING,
        attempts=max(row.attempts - 1, 0),
        next_attempt_at=now + policy.route_retry_ms,
        last_error=ROUTE_UNAVAILABLE,
        retry_in_ms=policy.route_retry_ms,
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


def on_rate_limited(row: OutboxRow, *, error: str, now: int, retry_at: int) -> Completion:
    """The broker refused the send for its rate (or its load): back-pressure.

    The attempt is given back and the row waits until its route may send
    again (`retry_at`, from the route's pacer): a rate limit never kills a
    message (only `max_age` does).
    """
    return Completion(
        row_id=row.id,
        lease_token=_require_inflight(row),
        status=Status.PENDING,
        attempts=max(row.attempts - 1, 0),
        next_attempt_at=max(now, retry_at),
        last_error=error,
        retry_in_ms=max(0, retry_at - now),
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


def on_no_answer(row: OutboxRow, *, reason: str, now: int, policy: RetryPolicy, jitter: float) -> Completion:
    """The frame may have reached the broker, but no answer came.

    With ``unknown_fate="resend"`` this is a transient error like any other;
    with ``"dead"`` the row goes dead (``unknown_fate: <reason>``) for an
    operator to review, since a resend through a broker that does not
    dedupe would deliver it twice.
    """
    if policy.unknown_fate == "dead":
        return _dead(row, f"{UNKNOWN_FATE}: {reason}")
    return on_error(row, error=reason, permanent=False, now=now, policy=policy, jitter=jitter)


def on_lease_expired(*, unknown_fate: UnknownFate, at_cap: bool) -> tuple[Status, str]:
    """Where a row whose lease ran out goes, and its last_error.

    Lease expiry is a send with no answer: back to pending to be resent,
    dead at the attempt cap, or dead as `unknown_fate` if so configured.
    The stores apply this in bulk.
    """
    if unknown_fate == "dead":
        return Status.DEAD, UNKNOWN_FATE_LEASE
    if at_cap:
        return Status.DEAD, LEASE_EXPIRED_AT_CAP
    return Status.PENDING, LEASE_EXPIRED


def on_no_broker(row: OutboxRow) -> Completion:
    """No broker is registered for the row's mesh: the row can never go out."""
    return _dead(row, f"no_broker_for_mesh:{row.mesh if row.mesh is not None else 'null'}")


def on_released(row: OutboxRow, *, sent: bool, now: int, policy: RetryPolicy) -> Completion:
    """The worker stopped while holding the row: hand it back at once.

    If the send never started the attempt is given back; if it may have
    left, the attempt stands and the broker's dedupe absorbs the resend.
    A row whose last allowed attempt may have left is dead, like a lease
    expiring at the cap: another claim would exceed max_attempts.
    """
    token = _require_inflight(row)
    if sent and policy.unknown_fate == "dead":
        return _dead(row, f"{UNKNOWN_FATE}: {WORKER_STOPPED}")
    if sent and row.attempts >= policy.max_attempts:
        return _dead(row, WORKER_STOPPED_AT_CAP)
    return Completion(
        row_id=row.id,
        lease_token=token,
        status=Status.PENDING,
        attempts=row.attempts if sent else max(row.attempts - 1, 0),
        next_attempt_at=now,
        last_error=WORKER_STOPPED if sent else row.last_error,
        retry_in_ms=0,
        ordering_key=row.ordering_key,
        enqueued_at=row.enqueued_at,
    )


# -- operator actions ---------------------------------------------------------


def requeued(
    row: OutboxRow, *, now: int, new_id: str, new_client_message_id: str, by: str
) -> tuple[OutboxRow, OutboxRow]:
    """Abort `row` and make its pending successor (fresh client_message_id,
    same payload, fingerprint and routing). Returns (aborted row, successor).

    An inflight row of an ordering lane keeps its lease's expiry once
    aborted: the send already on its way may still reach the broker, so its
    lane is held (`_rules.holds_lane`) until the lease runs out (a late
    answer from its worker no longer applies to it), lest a later row of
    the lane overtake it.

    Raises:
        InvalidTransition: the row is done or already aborted.
    """
    if row.status not in REQUEUEABLE:
        raise InvalidTransition(f"cannot requeue a {row.status.value} row ({row.id})")
    successor = attrs.evolve(
        row,
        id=new_id,
        client_message_id=new_client_message_id,
        enqueued_at=now,
        attempts=0,
        next_attempt_at=now,
        status=Status.PENDING,
        last_error=None,
        delivered_at=None,
        broker_message_id=None,
        aborted_at=None,
        aborted_by=None,
        superseded_by=None,
        lease_expires_at=None,
        lease_token=None,
    )
    aborted = attrs.evolve(
        row,
        status=Status.ABORTED,
        aborted_at=now,
        aborted_by=by,
        superseded_by=new_id,
        lease_expires_at=row.lease_expires_at if holds_lane_once_aborted(row) else None,
        lease_token=None,
    )
    return aborted, successor


def holds_lane_once_aborted(row: OutboxRow) -> bool:
    """Whether `row`, aborted now, goes on holding its lane until its lease
    runs out: an inflight row of a lane (its send may be on its way)."""
    return row.status is Status.INFLIGHT and row.ordering_key is not None


def dropped(row: OutboxRow, *, now: int, by: str = "operator") -> OutboxRow:
    """Abort a pending or dead row with no successor.

    Raises:
        InvalidTransition: the row is inflight, done or already aborted.
    """
    if row.status not in DROPPABLE:
        raise InvalidTransition(f"cannot drop a {row.status.value} row ({row.id})")
    return attrs.evolve(row, status=Status.ABORTED, aborted_at=now, aborted_by=by)
