"""What every back end must do alike: claims, fencing, inspection, operator
actions. Each test runs against SQLite and PostgreSQL (see conftest)."""

from __future__ import annotations

import functools

import attrs
import pytest

from trio_drain import InvalidTransition, Outbox, Status, UnknownRow
from trio_drain import _lifecycle as lc
from trio_drain._store._base import RouteFilter

from . import builders
from .builders import BIG
from .helpers import FakeClock

#: The requests here are broadcasts.
req = functools.partial(builders.req, target_spec="*")


# -- claims ------------------------------------------------------------------


async def test_claims_take_priority_then_enqueue_order(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    for cid, prio in [("a", "low"), ("b", "next"), ("c", "now"), ("d", "next"), ("e", "now")]:
        await ob.accept(req(cid, priority=prio))
        clock.advance(1)
    rows = await ob.claim(limit=3, lease_ms=1000, max_age_ms=BIG, token="t")
    assert [r.client_message_id for r in rows] == ["c", "e", "b"]
    assert all(r.status is Status.INFLIGHT and r.attempts == 1 and r.lease_token == "t" for r in rows)
    assert all(r.lease_expires_at == clock.now + 1000 for r in rows)
    rest = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="u")
    assert [r.client_message_id for r in rest] == ["d", "a"]


async def test_claims_skip_rows_not_yet_due_and_rows_past_max_age(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept(req("old"))
    clock.advance(10_000)
    await ob.accept(req("young"))
    (young,) = await ob.claim(limit=10, lease_ms=1000, max_age_ms=5_000, token="t")
    assert young.client_message_id == "young"
    await ob.complete(
        [lc.on_error(young, error="x", permanent=False, now=clock.now, policy=lc.RetryPolicy(), jitter=0.0)]
    )
    assert await ob.claim(limit=10, lease_ms=1000, max_age_ms=5_000, token="u") == []
    assert await ob.next_due_at(max_age_ms=5_000) == clock.now + 250
    assert await ob.expire_stale(max_age_ms=5_000) == 1
    old = await ob.get_by_client_id("old")
    assert old is not None and (old.status, old.last_error) == (Status.DEAD, "expired")


async def test_claims_leave_blocked_routes_alone(clocked_outbox: Outbox) -> None:
    ob = clocked_outbox
    key = "ab" * 32
    await ob.accept_many(
        [
            req("sess", sender_session_pubkey=key),
            req("mesh-a"),
            req("mesh-b", mesh="beta"),
            req("no-mesh", mesh=None),
        ]
    )
    blocked = RouteFilter(sessions=frozenset({key}), meshes=frozenset({"alpha"}), null_mesh=True)
    rows = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="t", exclude=blocked)
    assert [r.client_message_id for r in rows] == ["mesh-b"]
    # A session row whose mesh is blocked still goes: sessions have their own socket.
    rows = await ob.claim(
        limit=10, lease_ms=1000, max_age_ms=BIG, token="t", exclude=RouteFilter(meshes=frozenset({"alpha"}))
    )
    assert sorted(r.client_message_id for r in rows) == ["no-mesh", "sess"]


# -- fencing -------------------------------------------------------------------------


async def test_a_stale_lease_changes_nothing(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await ob.accept(req("m-1"))
    (first,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t1")
    clock.advance(1000)
    assert await ob.recover_expired_leases(max_attempts=25) == 1
    (second,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t2")
    assert second.attempts == 2
    # The first worker's late ack applies to nothing.
    assert await ob.complete([lc.on_ack(first, broker_message_id="late", now=clock.now)]) == [False]
    row = await ob.get(first.id)
    assert row is not None and (row.status, row.lease_token) == (Status.INFLIGHT, "t2")
    assert await ob.complete([lc.on_ack(second, broker_message_id="b", now=clock.now)]) == [True]
    assert await ob.complete([lc.on_ack(second, broker_message_id="again", now=clock.now)]) == [False]
    row = await ob.get(first.id)
    assert row is not None and (row.status, row.broker_message_id, row.lease_token) == (
        Status.DONE,
        "b",
        None,
    )


async def test_a_batch_with_one_stale_lease_applies_the_others(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i}") for i in range(5)])
    rows = await ob.claim(limit=5, lease_ms=1000, max_age_ms=BIG, token="t1")
    stale = lc.on_ack(rows[2], broker_message_id="late", now=clock.now)
    await ob.complete(
        [lc.on_error(rows[2], error="x", permanent=True, now=clock.now, policy=lc.RetryPolicy(), jitter=0)]
    )
    batch = [lc.on_ack(r, broker_message_id=f"b{i}", now=clock.now) for i, r in enumerate(rows) if i != 2]
    batch.insert(2, stale)
    assert await ob.complete(batch) == [True, True, False, True, True]
    after = {r.client_message_id: r for r in await ob.list(limit=10)}
    assert [after[f"m-{i}"].status for i in range(5)] == [Status.DONE] * 2 + [Status.DEAD] + [Status.DONE] * 2
    assert after["m-3"].broker_message_id == "b3" and after["m-2"].broker_message_id is None


async def test_complete_and_claim_records_outcomes_and_claims_more_in_one_call(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i}") for i in range(5)])
    first = await ob.claim(limit=2, lease_ms=1000, max_age_ms=BIG, token="t1")
    applied, more = await ob.complete_and_claim(
        [lc.on_ack(r, broker_message_id=f"b-{r.client_message_id}", now=clock.now) for r in first],
        limit=2,
        lease_ms=1000,
        max_age_ms=BIG,
        token="t2",
    )
    assert applied == [True, True]
    assert [r.client_message_id for r in more] == ["m-2", "m-3"]
    assert {(r.status, r.attempts, r.lease_token) for r in more} == {(Status.INFLIGHT, 1, "t2")}
    assert (await ob.counts()) == {"pending": 1, "inflight": 2, "done": 2, "dead": 0, "aborted": 0}
    row = await ob.get(first[0].id)
    assert row is not None and row.broker_message_id == "b-m-0"


async def test_leases_not_yet_expired_are_not_recovered(clocked_outbox: Outbox, clock: FakeClock) -> None:
    await clocked_outbox.accept(req("m-1"))
    await clocked_outbox.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    clock.advance(999)
    assert await clocked_outbox.recover_expired_leases(max_attempts=25) == 0


# -- inspection and operator actions ----------------------------------------------------


async def test_list_is_newest_first_filtered_and_pageable(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    for i in range(5):
        await ob.accept(req(f"m-{i}"))
        clock.advance(10)
    rows = await ob.list(limit=3)
    assert [r.client_message_id for r in rows] == ["m-4", "m-3", "m-2"]
    older = await ob.list(limit=3, before=rows[-1].enqueued_at)
    assert [r.client_message_id for r in older] == ["m-1", "m-0"]
    assert await ob.list("done") == []
    assert len(await ob.list(Status.PENDING)) == 5


async def test_counts_always_have_all_five_statuses(outbox: Outbox) -> None:
    assert await outbox.counts() == {"pending": 0, "inflight": 0, "done": 0, "dead": 0, "aborted": 0}


async def test_requeue_aborts_the_row_and_enqueues_a_fresh_copy(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    outcome = await ob.accept(req("m-1", meta={"k": 1}))
    (row,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    await ob.complete(
        [
            lc.on_error(
                row, error="forbidden", permanent=True, now=clock.now, policy=lc.RetryPolicy(), jitter=0
            )
        ]
    )
    clock.advance(5)
    successor = await ob.requeue(row.id)
    old = await ob.get(row.id)
    assert old is not None
    assert (old.status, old.aborted_by, old.superseded_by, old.aborted_at) == (
        Status.ABORTED,
        "operator",
        successor.id,
        clock.now,
    )
    assert successor.client_message_id != "m-1"
    assert (successor.status, successor.attempts, successor.payload, successor.request_fingerprint) == (
        Status.PENDING,
        0,
        old.payload,
        old.request_fingerprint,
    )
    assert (successor.mesh, successor.target_spec, successor.priority) == (
        old.mesh,
        old.target_spec,
        old.priority,
    )
    assert await ob.get(successor.id) == successor
    assert outcome.row_id == row.id


async def test_requeue_of_an_inflight_row_fences_the_old_lease(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    await clocked_outbox.accept(req("m-1"))
    (row,) = await clocked_outbox.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    await clocked_outbox.requeue(row.id)
    assert await clocked_outbox.complete([lc.on_ack(row, broker_message_id="b", now=clock.now)]) == [False]


async def test_operator_actions_refuse_unknown_rows_and_wrong_states(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    with pytest.raises(UnknownRow):
        await ob.requeue("nope")
    with pytest.raises(UnknownRow):
        await ob.drop("nope")
    await ob.accept(req("m-1"))
    (row,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    with pytest.raises(InvalidTransition):
        await ob.drop(row.id)  # inflight: the worker owns it
    await ob.complete([lc.on_ack(row, broker_message_id="b", now=clock.now)])
    with pytest.raises(InvalidTransition):
        await ob.requeue(row.id)
    with pytest.raises(InvalidTransition):
        await ob.drop(row.id)
    after = await ob.get(row.id)
    assert after is not None and after.status is Status.DONE


async def test_prune_deletes_only_old_done_rows(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i}") for i in range(4)])
    rows = await ob.claim(limit=4, lease_ms=1000, max_age_ms=BIG, token="t")
    policy = lc.RetryPolicy()
    await ob.complete(
        [
            lc.on_ack(rows[0], broker_message_id="b0", now=clock.now),
            lc.on_error(rows[1], error="forbidden", permanent=True, now=clock.now, policy=policy, jitter=0),
            lc.on_ack(rows[2], broker_message_id="b2", now=clock.now + 10_000),
        ]
    )
    await ob.drop(rows[1].id)
    clock.advance(5_000)
    assert await ob.prune(older_than=1.0) == 1  # rows[0] only; rows[2] is too young
    assert await ob.get(rows[0].id) is None
    assert (await ob.counts()) == {"pending": 0, "inflight": 1, "done": 1, "dead": 0, "aborted": 1}


async def test_stored_rows_round_trip_every_column(clocked_outbox: Outbox) -> None:
    request = req(
        "m-1",
        priority="low",
        nonce="bm9uY2U=",
        ciphertext="Y3Q=",
        reply_to_id="r-0",
        sender_session_pubkey="cd" * 32,
        target_spec="ef" * 32,
    )
    await clocked_outbox.accept(request)
    row = await clocked_outbox.get_by_client_id("m-1")
    assert row is not None
    assert attrs.asdict(
        row,
        filter=lambda a, v: (
            a.name in ("nonce", "ciphertext", "priority", "sender_session_pubkey", "target_spec")
        ),
    ) == {
        "nonce": "bm9uY2U=",
        "ciphertext": "Y3Q=",
        "priority": "low",
        "sender_session_pubkey": "cd" * 32,
        "target_spec": "ef" * 32,
    }


# -- rows whose fate is unknown ----------------------------------------------------------


@pytest.mark.parametrize("fate", ["resend", "dead"])
async def test_expired_leases_go_where_the_state_machine_says_for_each_unknown_fate_policy(
    clocked_outbox: Outbox,
    clock: FakeClock,
    fate: lc.UnknownFate,
) -> None:
    ob = clocked_outbox
    await ob.accept_many([req("young"), req("at-cap"), req("live"), req("other")])
    rows = {r.client_message_id: r for r in await ob.claim(limit=4, lease_ms=1000, max_age_ms=BIG, token="t")}
    # One row has used its last attempt; "live" is given back and claimed again (its lease runs on).
    await ob.complete(
        [
            lc.Completion(
                row_id=rows["at-cap"].id,
                lease_token="t",
                status=Status.PENDING,
                attempts=3,
                next_attempt_at=clock.now,
            )
        ]
    )
    (at_cap,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t2")
    assert at_cap.attempts == 4
    clock.advance(1000)
    await ob.complete([lc.on_released(rows["live"], sent=False, now=clock.now, policy=lc.RetryPolicy())])
    (live,) = await ob.claim(limit=1, lease_ms=5000, max_age_ms=BIG, token="t3")
    assert live.client_message_id == "live"
    assert await ob.recover_expired_leases(max_attempts=4, unknown_fate=fate) == 3
    found = {cid: await ob.get_by_client_id(cid) for cid in ("young", "at-cap", "other", "live")}
    for cid, row in found.items():
        assert row is not None
        if cid == live.client_message_id:
            assert row.status is Status.INFLIGHT, "a live lease is left alone"
            continue
        status, error = lc.on_lease_expired(unknown_fate=fate, at_cap=cid == "at-cap")
        assert (row.status, row.last_error, row.lease_token) == (status, error, None), cid
        assert row.next_attempt_at == (clock.now if status is Status.PENDING else row.next_attempt_at)
    if fate == "dead":
        assert {r.last_error for r in found.values() if r and r.status is Status.DEAD} == {
            "unknown_fate: lease_expired"
        }
