"""The row state machine as pure functions: backoff, transitions, idempotency."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_drain import InvalidTransition, OutboxRow, OutcomeKind, Status
from trio_drain import _lifecycle as lc
from trio_drain._idempotency import decide_accept

from .builders import claimed_row

POLICY = lc.RetryPolicy(max_attempts=5, backoff_base_ms=500, backoff_cap_ms=30_000)


@given(
    attempts=st.integers(1, 200),
    base=st.integers(1, 10_000),
    extra=st.integers(0, 100_000),
    jitter=st.floats(0, 1),
)
def test_backoff_never_exceeds_the_cap_and_is_positive(
    attempts: int, base: int, extra: int, jitter: float
) -> None:
    cap = base + extra
    delay = lc.backoff_ms(attempts, base_ms=base, cap_ms=cap, jitter=jitter)
    assert 1 <= delay <= cap


@given(attempts=st.integers(1, 30), jitter=st.floats(0, 1))
def test_backoff_lies_in_the_upper_half_of_the_exponential_step(attempts: int, jitter: float) -> None:
    step = min(30_000, 500 * 2 ** (attempts - 1))
    delay = lc.backoff_ms(attempts, base_ms=500, cap_ms=30_000, jitter=jitter)
    assert step // 2 <= delay <= step


@given(a=st.integers(1, 6), jitter=st.floats(0, 1))
def test_backoff_grows_with_attempts_below_the_cap(a: int, jitter: float) -> None:
    # The slowest try after a+1 failures waits at least as long as the
    # fastest... of the step before: steps double, jitter spans half a step.
    low_next = lc.backoff_ms(a + 1, base_ms=500, cap_ms=10**9, jitter=0.0)
    high_now = lc.backoff_ms(a, base_ms=500, cap_ms=10**9, jitter=1.0)
    assert low_next >= high_now


def test_ack_moves_to_done_keeping_attempts_and_clearing_the_error() -> None:
    c = lc.on_ack(claimed_row(last_error="x"), broker_message_id="b-9", now=123)
    assert (c.status, c.attempts, c.delivered_at, c.broker_message_id, c.last_error) == (
        Status.DONE,
        1,
        123,
        "b-9",
        None,
    )
    assert c.lease_token == "t"


def test_transient_error_backs_off_and_records_the_error() -> None:
    c = lc.on_error(
        claimed_row(attempts=2), error="boom", permanent=False, now=1000, policy=POLICY, jitter=0.5
    )
    assert c.status is Status.PENDING
    assert c.last_error == "boom"
    assert 1000 + 500 <= c.next_attempt_at <= 1000 + 1000


def test_transient_error_at_the_attempt_cap_is_dead_with_max_attempts_prefix() -> None:
    c = lc.on_error(claimed_row(attempts=5), error="boom", permanent=False, now=0, policy=POLICY, jitter=0.5)
    assert (c.status, c.last_error) == (Status.DEAD, "max_attempts: boom")


def test_permanent_error_is_dead_with_the_brokers_error() -> None:
    c = lc.on_error(claimed_row(), error="forbidden", permanent=True, now=0, policy=POLICY, jitter=0.5)
    assert (c.status, c.last_error) == (Status.DEAD, "forbidden")


def test_route_unavailable_gives_the_attempt_back() -> None:
    c = lc.on_route_unavailable(claimed_row(attempts=3), now=100, policy=POLICY)
    assert (c.status, c.attempts, c.next_attempt_at) == (Status.PENDING, 2, 100 + POLICY.route_retry_ms)


@pytest.mark.parametrize(
    ("mesh", "error"), [("beta", "no_broker_for_mesh:beta"), (None, "no_broker_for_mesh:null")]
)
def test_no_broker_is_dead_naming_the_mesh(mesh: str | None, error: str) -> None:
    c = lc.on_no_broker(claimed_row(mesh=mesh))
    assert (c.status, c.last_error) == (Status.DEAD, error)


def test_release_before_the_send_gives_the_attempt_back_and_after_keeps_it() -> None:
    before = lc.on_released(claimed_row(attempts=4), sent=False, now=7, policy=POLICY)
    after = lc.on_released(claimed_row(attempts=4), sent=True, now=7, policy=POLICY)
    assert (before.status, before.attempts, before.next_attempt_at) == (Status.PENDING, 3, 7)
    assert (after.status, after.attempts, after.last_error) == (Status.PENDING, 4, lc.WORKER_STOPPED)


def test_a_release_after_the_last_allowed_send_is_dead_not_a_new_attempt() -> None:
    # Found by the store state machine: handed back at the cap, the row was
    # claimed once more and went past max_attempts.
    cap = POLICY.max_attempts
    after = lc.on_released(claimed_row(attempts=cap), sent=True, now=7, policy=POLICY)
    assert (after.status, after.attempts, after.last_error) == (Status.DEAD, cap, lc.WORKER_STOPPED_AT_CAP)
    before = lc.on_released(claimed_row(attempts=cap), sent=False, now=7, policy=POLICY)
    assert (before.status, before.attempts) == (Status.PENDING, cap - 1)


def test_transitions_out_of_inflight_refuse_an_unclaimed_row() -> None:
    with pytest.raises(ValueError):
        lc.on_ack(claimed_row(status=Status.PENDING, lease_token=None), broker_message_id="b", now=0)


def test_claimability_requires_due_and_unexpired() -> None:
    pol = lc.RetryPolicy(max_age_ms=1000)
    row = claimed_row(status=Status.PENDING, lease_token=None, next_attempt_at=50, enqueued_at=0)
    world = lc.Table([row])
    assert not lc.is_claimable(row, now=49, policy=pol, world=world)
    assert lc.is_claimable(row, now=50, policy=pol, world=world)
    assert not lc.is_claimable(row, now=1001, policy=pol, world=world)
    assert lc.is_expired(row, now=1001, policy=pol)


def test_only_the_first_pending_or_inflight_row_of_a_lane_is_claimable() -> None:
    pol = lc.RetryPolicy()

    def lane_row(row_id: str, at: int, status: Status = Status.PENDING, key: str | None = "k") -> OutboxRow:
        return claimed_row(
            id=row_id, status=status, lease_token=None, next_attempt_at=0, enqueued_at=at, ordering_key=key
        )

    first, second, third = lane_row("a", 1), lane_row("b", 2), lane_row("c", 2)
    other, free = lane_row("x", 9, key="other"), lane_row("f", 9, key=None)
    rows = [third, second, first, other, free]
    claimable = {r.id for r in rows if lc.is_claimable(r, now=10, policy=pol, world=lc.Table(rows))}
    assert claimable == {"a", "x", "f"}  # a lane's head, another lane's head, a row with no lane
    # A head in flight or retrying holds its lane; done, dead or aborted, it lets the next go
    # (enqueue time, then id: "b" before "c"); aborted in flight, it holds its lane until
    # its lease has run out (`recover_expired_leases` clears it).
    for status, lease, after in [
        (Status.INFLIGHT, 100, set()),
        (Status.DONE, None, {"b"}),
        (Status.DEAD, None, {"b"}),
        (Status.ABORTED, None, {"b"}),
        (Status.ABORTED, 100, set()),
    ]:
        moved = [attrs.evolve(first, status=status, lease_expires_at=lease), second, third]
        assert {r.id for r in moved if lc.is_claimable(r, now=10, policy=pol, world=lc.Table(moved))} == after


def test_a_paused_route_is_not_claimable_and_nothing_else_is_affected() -> None:
    pol = lc.RetryPolicy()
    mesh_row = claimed_row(id="m", status=Status.PENDING, lease_token=None, next_attempt_at=0, mesh="alpha")
    session_row = attrs.evolve(mesh_row, id="s", sender_session_pubkey="ab" * 32)
    world = lc.Table([mesh_row, session_row], paused=frozenset({"mesh:alpha"}))
    assert not lc.is_claimable(mesh_row, now=10, policy=pol, world=world)
    assert lc.is_claimable(session_row, now=10, policy=pol, world=world)  # a session is a route of its own
    assert lc.route_name(session_row) == "session:" + "ab" * 32
    with pytest.raises(ValueError, match="needs a World"):
        lc.holds(lc.CLAIMABLE, mesh_row, now=10, policy=pol)


@pytest.mark.parametrize("status", list(Status))
def test_requeue_and_drop_are_allowed_exactly_from_the_specified_states(status: Status) -> None:
    row = claimed_row(status=status)
    if status in (Status.PENDING, Status.INFLIGHT, Status.DEAD):
        aborted, successor = lc.requeued(row, now=5, new_id="r2", new_client_message_id="m-2", by="op")
        assert (aborted.status, aborted.superseded_by, aborted.aborted_by) == (Status.ABORTED, "r2", "op")
        assert (successor.status, successor.attempts, successor.client_message_id) == (
            Status.PENDING,
            0,
            "m-2",
        )
        assert (successor.payload, successor.request_fingerprint, successor.mesh) == (
            row.payload,
            row.request_fingerprint,
            row.mesh,
        )
    else:
        with pytest.raises(InvalidTransition):
            lc.requeued(row, now=5, new_id="r2", new_client_message_id="m-2", by="op")
    if status in (Status.PENDING, Status.DEAD):
        assert lc.dropped(row, now=5).status is Status.ABORTED
    else:
        with pytest.raises(InvalidTransition):
            lc.dropped(row, now=5)


# The idempotency table of the spec, written out independently.
EXPECTED = {
    (Status.PENDING, True): (OutcomeKind.ACCEPTED_PENDING, 202, None),
    (Status.INFLIGHT, True): (OutcomeKind.ACCEPTED_INFLIGHT, 202, None),
    (Status.DONE, True): (OutcomeKind.ACCEPTED_DONE, 200, None),
    (Status.DEAD, True): (OutcomeKind.CONFLICT, 409, "outbox_dead_fingerprint_match"),
    (Status.ABORTED, True): (OutcomeKind.CONFLICT, 409, "outbox_aborted_fingerprint_match"),
}


@given(status=st.sampled_from(list(Status)), same=st.booleans(), fp=st.binary(min_size=32, max_size=32))
def test_the_idempotency_table(status: Status, same: bool, fp: bytes) -> None:
    existing = claimed_row(status=status, request_fingerprint=fp, broker_message_id="b-1")
    asked = fp if same else bytes(b ^ 0xFF for b in fp)
    outcome = decide_accept(existing, client_message_id="m-1", fingerprint=asked)
    kind, code, reason = EXPECTED.get(
        (status, same), (OutcomeKind.CONFLICT, 409, f"outbox_{status.value}_fingerprint_mismatch")
    )
    assert (outcome.kind, outcome.code, outcome.reason) == (kind, code, reason)
    assert not outcome.inserted
    assert outcome.broker_message_id == "b-1"
    if kind is OutcomeKind.CONFLICT:
        assert outcome.fingerprint_prefix == fp[:8].hex()


def test_no_existing_row_means_insert() -> None:
    outcome = decide_accept(None, client_message_id="m-1", fingerprint=b"x" * 32)
    assert (outcome.kind, outcome.code, outcome.inserted) == (OutcomeKind.ACCEPTED_PENDING, 202, True)


def test_minted_ids_are_valid_increasing_uuid7s() -> None:
    import uuid

    from trio_drain._ids import uuid7

    ids = [uuid7() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000
    for text in ids[:50]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)


# -- back-pressure and unknown fates --------------------------------------------------


@given(attempts=st.integers(1, 100), wait=st.integers(-1000, 100_000))
def test_a_rate_limit_gives_the_attempt_back_and_never_kills_even_at_the_cap(
    attempts: int, wait: int
) -> None:
    row = claimed_row(attempts=attempts)
    c = lc.on_rate_limited(row, error="rate_limit: max 60 msg/min", now=1000, retry_at=1000 + wait)
    assert (c.status, c.attempts, c.last_error) == (
        Status.PENDING,
        attempts - 1,
        "rate_limit: max 60 msg/min",
    )
    assert c.next_attempt_at == max(1000, 1000 + wait)


@pytest.mark.parametrize("reason", ["ack_timeout", "broker_disconnected"])
def test_no_answer_is_a_transient_error_or_dead_for_review_as_the_policy_says(reason: str) -> None:
    row = claimed_row(attempts=2)
    resend = lc.on_no_answer(row, reason=reason, now=1000, policy=POLICY, jitter=0.5)
    assert resend == lc.on_error(row, error=reason, permanent=False, now=1000, policy=POLICY, jitter=0.5)
    review = lc.on_no_answer(
        row, reason=reason, now=1000, policy=attrs.evolve(POLICY, unknown_fate="dead"), jitter=0.5
    )
    assert (review.status, review.attempts, review.last_error) == (Status.DEAD, 2, f"unknown_fate: {reason}")


def test_a_row_that_left_when_the_worker_stopped_is_dead_for_review_under_unknown_fate_dead() -> None:
    policy = attrs.evolve(POLICY, unknown_fate="dead")
    sent = lc.on_released(claimed_row(), sent=True, now=5, policy=policy)
    assert (sent.status, sent.last_error) == (Status.DEAD, "unknown_fate: worker_stopped")
    unsent = lc.on_released(claimed_row(), sent=False, now=5, policy=policy)
    assert (unsent.status, unsent.attempts) == (Status.PENDING, 0), (
        "a row that never left is known: back it goes"
    )


def test_lease_expiry_follows_the_policy_and_the_cap() -> None:
    assert lc.on_lease_expired(unknown_fate="resend", at_cap=False) == (Status.PENDING, lc.LEASE_EXPIRED)
    assert lc.on_lease_expired(unknown_fate="resend", at_cap=True) == (Status.DEAD, lc.LEASE_EXPIRED_AT_CAP)
    for at_cap in (False, True):
        assert lc.on_lease_expired(unknown_fate="dead", at_cap=at_cap) == (
            Status.DEAD,
            "unknown_fate: lease_expired",
        )
