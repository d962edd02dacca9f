"""Ordering lanes and paused routes in the stores, on SQLite and PostgreSQL.

A lane's rows go out one at a time in accept order: a claim takes only a
lane's head; a head that retries, waits out an outage or comes back through
its lease holds its lane; one that goes done, dead or aborted lets the next
row go, in the same transaction. A paused route's rows are not claimed, and
nothing else about them changes.
"""

from __future__ import annotations

import functools
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_drain import OutboxRow, Status, open_outbox
from trio_drain import _lifecycle as lc
from trio_drain._outbox import Outbox
from trio_drain._store._base import SCHEMA_VERSION

from .builders import BIG, req
from .helpers import FakeClock
from .pg import PostgresServer

POLICY = lc.RetryPolicy(max_attempts=3, backoff_base_ms=100, backoff_cap_ms=100, lease_ms=1000)


async def claim(ob: Outbox, limit: int = 50, token: str = "t") -> list[OutboxRow]:
    return list(await ob.claim(limit=limit, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token=token))


def ids(rows: Sequence[OutboxRow]) -> list[str]:
    return sorted(r.client_message_id for r in rows)


async def fill_lane(ob: Outbox, clock: FakeClock, key: str, n: int, prefix: str = "") -> None:
    for i in range(n):
        await ob.accept(req(f"{prefix or key}-{i}", ordering_key=key))
        clock.advance(1)


async def test_a_claim_takes_only_the_head_of_each_lane(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 3)
    await fill_lane(ob, clock, "j", 2)
    await ob.accept(req("free-0"))
    await ob.accept(req("free-1"))
    assert ids(await claim(ob)) == ["free-0", "free-1", "j-0", "k-0"]
    assert await claim(ob) == []  # the heads are in flight: their lanes wait


async def test_each_outcome_of_a_head_holds_or_releases_its_lane_as_the_spec_says(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 5)
    (head,) = await claim(ob)
    # Transient error: the head is retried first; the lane waits meanwhile.
    await ob.complete([lc.on_error(head, error="e", permanent=False, now=clock.now, policy=POLICY, jitter=0)])
    assert await claim(ob) == []
    clock.advance(1000)
    (again,) = await claim(ob)
    assert again.id == head.id
    # Route down and rate limited: the attempt is given back, the lane still waits.
    await ob.complete([lc.on_route_unavailable(again, now=clock.now, policy=POLICY)])
    clock.advance(1000)
    (again,) = await claim(ob)
    await ob.complete([lc.on_rate_limited(again, error="rate_limit", now=clock.now, retry_at=clock.now)])
    (again,) = await claim(ob)
    assert again.id == head.id
    # Acked: the next row goes, in the same transaction as the outcome.
    applied, (second,) = await ob.complete_and_claim(
        [lc.on_ack(again, broker_message_id="b", now=clock.now)],
        limit=10,
        lease_ms=POLICY.lease_ms,
        max_age_ms=BIG,
        token="t2",
    )
    assert applied == [True] and second.client_message_id == "k-1"
    # Dead: the next goes.
    await ob.complete(
        [lc.on_error(second, error="bad", permanent=True, now=clock.now, policy=POLICY, jitter=0)]
    )
    (third,) = await claim(ob)
    assert third.client_message_id == "k-2"
    # Its lease runs out: it comes back first, still the head.
    clock.advance(POLICY.lease_ms)
    assert await ob.recover_expired_leases(max_attempts=POLICY.max_attempts) == 1
    (third_again,) = await claim(ob)
    assert third_again.id == third.id


async def test_an_aborted_head_lets_the_next_go_and_a_requeued_row_joins_the_end(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 3)
    first = await ob.get_by_client_id("k-0")
    assert first is not None
    successor = await ob.requeue(first.id)  # a pending head, requeued
    clock.advance(1)
    (head,) = await claim(ob)
    assert head.client_message_id == "k-1"  # the lane moved on; the copy waits at the end
    await ob.complete([lc.on_ack(head, broker_message_id="b", now=clock.now)])
    second = await ob.get_by_client_id("k-2")
    assert second is not None
    await ob.drop(second.id)  # a pending head, dropped
    (last,) = await claim(ob)
    assert last.id == successor.id


async def test_a_head_requeued_in_flight_holds_its_lane_until_its_lease_runs_out(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    # Its send may still be on its way to the broker: a later row of the
    # lane must not overtake it.
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 2)
    (head,) = await claim(ob)
    copy = await ob.requeue(head.id)
    assert await claim(ob) == []  # k-1 waits: the aborted head's send may be on its way
    clock.advance(POLICY.lease_ms)
    await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    (second,) = await claim(ob)
    assert second.client_message_id == "k-1"
    # Its worker's late answer changes nothing (the row is no longer its): the hold ends with the lease.
    await ob.complete([lc.on_ack(second, broker_message_id="b", now=clock.now)])
    (held,) = await claim(ob)
    assert held.id == copy.id
    await ob.requeue(held.id)
    assert await ob.complete([lc.on_ack(held, broker_message_id="b", now=clock.now)]) == [False]
    assert await claim(ob) == []
    clock.advance(POLICY.lease_ms)
    await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    (last,) = await claim(ob)
    assert last.ordering_key == "k" and last.id not in (head.id, copy.id)


async def test_a_row_joining_a_lane_held_by_a_head_requeued_in_flight_waits_for_the_hold(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    # Found by the store state machine in CI: the joining row walked back
    # past the dropped copy to the aborted head, took "left as head" for
    # "holds nothing" and went while the head's send could be on its way.
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 1)
    (head,) = await claim(ob)
    copy = await ob.requeue(head.id)
    await ob.drop(copy.id)
    await ob.accept(req("k-late", ordering_key="k"))
    assert await claim(ob) == []  # the aborted head's lease still runs
    clock.advance(POLICY.lease_ms)
    await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    (late,) = await claim(ob)
    assert late.client_message_id == "k-late"


@pytest.mark.parametrize("then", ["drop the dead head", "requeue the dead head", "a late answer for it"])
async def test_an_earlier_head_leaving_again_cannot_release_past_a_head_that_holds_the_lane(
    clocked_outbox: Outbox, clock: FakeClock, then: str
) -> None:
    # k-0 went dead, k-1 went out and was requeued in flight (its send may
    # be on its way). Whatever k-0 does now, k-1's copy waits for the hold.
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 2)
    (dead,) = await claim(ob)
    await ob.complete([lc.on_error(dead, error="no", permanent=True, now=clock.now, policy=POLICY, jitter=0)])
    (head,) = await claim(ob)
    assert head.client_message_id == "k-1"
    copy = await ob.requeue(head.id)
    if then == "drop the dead head":
        await ob.drop(dead.id)
    elif then == "requeue the dead head":
        await ob.requeue(dead.id)
    else:
        assert await ob.complete([lc.on_ack(dead, broker_message_id="b", now=clock.now)]) == [False]
    assert await claim(ob) == []
    clock.advance(POLICY.lease_ms)
    await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    (after,) = await claim(ob)
    assert after.id == copy.id


async def test_prune_leaves_a_row_that_holds_its_lane(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 1)
    (head,) = await claim(ob)
    copy = await ob.requeue(head.id)
    clock.advance(10)
    assert await ob.prune(0.001, status=Status.ABORTED) == 0
    clock.advance(POLICY.lease_ms)
    await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    (after,) = await claim(ob)
    assert after.id == copy.id
    assert await ob.prune(0.001, status=Status.ABORTED) == 1  # its hold is over


async def test_a_head_lost_to_its_lease_at_the_attempt_cap_or_to_max_age_releases_the_lane(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 3)
    for _ in range(POLICY.max_attempts):
        (head,) = await claim(ob)
        assert head.client_message_id == "k-0"
        clock.advance(POLICY.lease_ms)
        await ob.recover_expired_leases(max_attempts=POLICY.max_attempts)
    assert (await ob.get(head.id)).status is Status.DEAD  # type: ignore[union-attr]
    (head,) = await claim(ob)
    assert head.client_message_id == "k-1"
    await ob.complete([lc.on_route_unavailable(head, now=clock.now, policy=POLICY)])
    # Both waiting rows pass max_age: swept to dead, the lane is empty, a new row goes at once.
    clock.advance(10_000)
    assert await ob.expire_stale(max_age_ms=5_000) == 2
    await ob.accept(req("k-new", ordering_key="k"))
    (head,) = await claim(ob)
    assert head.client_message_id == "k-new"


async def test_a_row_that_leaves_its_lane_while_waiting_lets_nothing_go(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 4)
    (head,) = await claim(ob)
    waiting = await ob.get_by_client_id("k-1")
    assert waiting is not None
    await ob.drop(waiting.id)  # dropped behind a head in flight
    assert await claim(ob) == []
    await ob.complete([lc.on_ack(head, broker_message_id="b", now=clock.now)])
    (head,) = await claim(ob)
    assert head.client_message_id == "k-2"
    # k-3 grows too old behind k-2 in flight; k-4 arrives fresh behind it.
    clock.advance(10_000)
    await ob.accept(req("k-4", ordering_key="k"))
    assert await ob.expire_stale(max_age_ms=5_000) == 1
    assert await claim(ob) == []
    await ob.complete([lc.on_ack(head, broker_message_id="b", now=clock.now)])
    (head,) = await claim(ob)
    assert head.client_message_id == "k-4"


async def test_a_clock_that_steps_back_cannot_reorder_a_lane(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await fill_lane(ob, clock, "k", 2)
    clock.advance(-60_000)
    await ob.accept_many([req("k-2", ordering_key="k"), req("k-3", ordering_key="k")])
    await ob.accept(req("k-4", ordering_key="k"))
    clock.advance(120_000)
    delivered = []
    while rows := await claim(ob):
        (head,) = rows
        delivered.append(head.client_message_id)
        await ob.complete([lc.on_ack(head, broker_message_id="b", now=clock.now)])
    assert delivered == ["k-0", "k-1", "k-2", "k-3", "k-4"]


async def test_a_paused_route_is_left_alone_and_resumes_as_it_was(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    for i in range(3):
        await ob.accept(req(f"a-{i}", mesh="alpha"))
        await ob.accept(req(f"b-{i}", mesh="beta"))
    assert await ob.pause(mesh="alpha", by="ops")
    assert not await ob.pause(mesh="alpha")  # already
    assert await ob.paused() == frozenset({"mesh:alpha"})
    assert ids(await claim(ob)) == ["b-0", "b-1", "b-2"]
    assert await ob.next_due_at(max_age_ms=BIG) is None  # nothing claimable: the worker sleeps
    assert await ob.resume(mesh="alpha")
    assert not await ob.resume(mesh="alpha")
    resumed = await claim(ob)
    assert ids(resumed) == ["a-0", "a-1", "a-2"]
    assert {r.attempts for r in resumed} == {1}  # the pause spent no attempt


async def test_pause_names_one_route(outbox: Outbox) -> None:
    from trio_drain import InvalidRequest

    with pytest.raises(InvalidRequest, match="one route"):
        await outbox.pause()
    with pytest.raises(InvalidRequest, match="one route"):
        await outbox.pause(mesh="a", session="b")


# -- a database written before lanes ------------------------------------------------


async def test_a_schema_1_sqlite_outbox_migrates_and_its_rows_still_drain(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept(req("old-0"))
    conn = sqlite3.connect(db_path)
    conn.executescript(
        """
        DROP INDEX outbox_lane; DROP INDEX outbox_claim; DROP INDEX outbox_due;
        ALTER TABLE outbox DROP COLUMN ordering_key; ALTER TABLE outbox DROP COLUMN lane_blocked;
        DROP TABLE trio_drain_paused;
        CREATE INDEX outbox_claim ON outbox (priority_rank, enqueued_at) WHERE status = 'pending';
        CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';
        UPDATE trio_drain_schema SET version = 1;
        """
    )
    conn.close()
    async with open_outbox(db_path) as ob:
        await ob.accept(req("new-0", ordering_key="k"))
        assert ids(await claim(ob)) == ["new-0", "old-0"]
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT version FROM trio_drain_schema").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_a_schema_1_postgresql_outbox_migrates_and_its_rows_still_drain(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept(req("old-0"))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in [
            "DROP INDEX outbox_lane",
            "DROP INDEX outbox_claim",
            "DROP INDEX outbox_due",
            "ALTER TABLE outbox DROP COLUMN ordering_key",
            "ALTER TABLE outbox DROP COLUMN lane_blocked",
            "DROP TABLE trio_drain_paused",
            "CREATE INDEX outbox_claim ON outbox (priority_rank, enqueued_at) WHERE status = 'pending'",
            "CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending'",
            "UPDATE trio_drain_schema SET version = 1",
        ]:
            conn.execute(statement)
    async with open_outbox(pg_url) as ob:
        await ob.accept(req("new-0", ordering_key="k"))
        assert ids(await claim(ob)) == ["new-0", "old-0"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM trio_drain_schema").fetchone() == (SCHEMA_VERSION,)


_SCHEMA_2_LANE_INDEXES = [
    "DROP INDEX outbox_lane",
    "CREATE INDEX outbox_lane ON outbox (ordering_key, enqueued_at, id)"
    " WHERE status IN ('pending', 'inflight') AND ordering_key IS NOT NULL",
    "CREATE INDEX outbox_lane_head ON outbox (ordering_key)"
    " WHERE status IN ('pending', 'inflight') AND lane_blocked = 0 AND ordering_key IS NOT NULL",
    "UPDATE trio_drain_schema SET version = 2",
]


async def _a_schema_2_lane_drains_in_order(target: str) -> None:
    async with open_outbox(target) as ob:
        (head,) = await claim(ob)
        assert head.client_message_id == "k-0"
        await ob.complete([lc.on_ack(head, broker_message_id="b", now=0)])
        (head,) = await claim(ob)
        assert head.client_message_id == "k-1"


async def test_a_schema_2_sqlite_outbox_gets_the_new_lane_index(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept_many([req("k-0", ordering_key="k"), req("k-1", ordering_key="k")])
    conn = sqlite3.connect(db_path)
    for statement in _SCHEMA_2_LANE_INDEXES:
        conn.execute(statement)
    conn.commit()
    conn.close()
    await _a_schema_2_lane_drains_in_order(str(db_path))
    conn = sqlite3.connect(db_path)
    lane_indexes = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'outbox_lane%'"))
    assert conn.execute("SELECT version FROM trio_drain_schema").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert "outbox_lane_head" not in lane_indexes
    assert "status" not in lane_indexes["outbox_lane"]


async def test_a_schema_2_postgresql_outbox_gets_the_new_lane_index(pg_url: str) -> None:
    async with open_outbox(pg_url) as ob:
        await ob.accept_many([req("k-0", ordering_key="k"), req("k-1", ordering_key="k")])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in _SCHEMA_2_LANE_INDEXES:
            conn.execute(statement)
    await _a_schema_2_lane_drains_in_order(pg_url)
    with psycopg.connect(pg_url) as conn:
        lane_indexes: dict[str, str] = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'outbox_lane%%'"
            ).fetchall()
        )
        assert conn.execute("SELECT version FROM trio_drain_schema").fetchone() == (SCHEMA_VERSION,)
    assert "outbox_lane_head" not in lane_indexes
    assert "status" not in lane_indexes["outbox_lane"]


def _raw(target: str) -> Any:
    """A DB-API connection of the test's own to `target`, committing each statement."""
    if target.startswith("postgresql://"):
        return psycopg.connect(target, autocommit=True)
    return sqlite3.connect(target, isolation_level=None)


def _as_schema_2(conn: Any, mark: str, *changes: tuple[str, Sequence[Any]]) -> None:
    """Apply `changes` (SQL with `?` marks, arguments) and make the outbox a schema 2 one."""
    for sql, args in changes:
        conn.execute(sql.replace("?", mark), args)
    for statement in _SCHEMA_2_LANE_INDEXES:
        conn.execute(statement)


async def test_schema_2_lanes_placed_out_of_order_are_repaired_as_they_migrate(outbox_target: str) -> None:
    # Schema 2 placed a row only after its lane's rows still to go: in the
    # same millisecond under a smaller id (another process's), a row could
    # sit before the lane's head; and a row stamped by a clock that stepped
    # back before a row that had left as head. Both shapes, made by hand.
    target = outbox_target
    mark = "%s" if target.startswith("postgresql://") else "?"
    async with open_outbox(target) as ob:
        await ob.accept_many([req(f"a-{i}", ordering_key="a") for i in range(2)])
        await ob.accept_many([req(f"b-{i}", ordering_key="b") for i in range(2)])
        heads = {r.client_message_id: r for r in await claim(ob)}
        await ob.complete([lc.on_ack(heads["b-0"], broker_message_id="m", now=0)])
    head_a, done_b = heads["a-0"], heads["b-0"]
    conn = _raw(target)
    try:
        _as_schema_2(
            conn,
            mark,
            # a-1: same millisecond as the head in flight, a smaller id.
            (
                "UPDATE outbox SET id = ?, enqueued_at = ? WHERE client_message_id = 'a-1'",
                ["00000000-0000-7000-8000-000000000000", head_a.enqueued_at],
            ),
            # b-1 (released when b-0 went done) moves before it.
            ("UPDATE outbox SET enqueued_at = ? WHERE client_message_id = 'b-1'", [done_b.enqueued_at - 10]),
        )
    finally:
        conn.close()
    async with open_outbox(target) as ob:
        await ob.accept(req("b-2", ordering_key="b"))
        assert ids(await claim(ob)) == ["b-1"]  # not b-2 as well
        await ob.complete([lc.on_ack(head_a, broker_message_id="m", now=0)])
        (next_a,) = await claim(ob)
        assert next_a.client_message_id == "a-1"  # not stuck before the head


# -- many claimers on PostgreSQL -------------------------------------------------------


async def _hammer(url: str, *, acceptors: int, claimers: int, lanes: int, rows: int, seed: int) -> None:
    """Acceptors and claimers, each on connections of its own, race over a
    few lanes, every accept, claim and outcome its own transaction, while a
    watcher reads what is committed. No lane may ever have two rows in
    flight (nor two heads in the store's bookkeeping), and each acceptor's
    rows of a lane are acked in the order it accepted them."""
    rng = random.Random(seed)
    acked: dict[str, list[str]] = {}
    done = trio.Event()
    violations: list[Any] = []

    async def acceptor(n: int) -> None:
        async with open_outbox(url) as ob:
            for i in range(rows):
                await ob.accept_many(
                    [req(f"{n}-{i:03d}-{lane}", ordering_key=f"lane-{lane}") for lane in range(lanes)]
                )
                await trio.sleep(rng.random() * 0.002)

    async def claimer(n: int) -> None:
        async with open_outbox(url) as ob:
            while not done.is_set():
                token = f"c{n}-{rng.random()}"
                claimed = await ob.claim(
                    limit=rng.randint(1, 4), lease_ms=60_000, max_age_ms=BIG, token=token
                )
                if not claimed:
                    await trio.sleep(0.001)
                    continue
                outcomes = []
                for row in claimed:
                    roll = rng.random()
                    if roll < 0.7:
                        outcomes.append(lc.on_ack(row, broker_message_id="b", now=0))
                    elif roll < 0.9:
                        outcomes.append(lc.on_released(row, sent=False, now=0, policy=POLICY))
                    else:
                        outcomes.append(
                            lc.on_error(row, error="x", permanent=True, now=0, policy=POLICY, jitter=0)
                        )
                await trio.sleep(rng.random() * 0.002)
                applied = await ob.complete(outcomes)
                for completion, ok, row in zip(outcomes, applied, claimed, strict=True):
                    if ok and completion.status is Status.DONE:
                        acked.setdefault(row.ordering_key or "", []).append(row.client_message_id)

    async def watcher() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not done.is_set():
                in_flight = conn.execute(
                    "SELECT ordering_key, count(*) FROM outbox WHERE status = 'inflight'"
                    " GROUP BY ordering_key HAVING count(*) > 1"
                ).fetchall()
                heads = conn.execute(
                    "SELECT ordering_key, count(*) FROM outbox WHERE status IN ('pending', 'inflight')"
                    " AND lane_blocked = 0 GROUP BY ordering_key HAVING count(*) > 1"
                ).fetchall()
                if in_flight or heads:
                    violations.append((in_flight, heads))
                found = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'inflight')) FROM outbox"
                ).fetchone()
                if found == (acceptors * rows * lanes, 0):
                    done.set()
                await trio.sleep(0.005)

    async with open_outbox(url):  # the schema, before anyone reads it
        pass
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            for n in range(acceptors):
                nursery.start_soon(acceptor, n)
            for n in range(claimers):
                nursery.start_soon(claimer, n)
    assert violations == []
    for lane, order in acked.items():
        for n in range(acceptors):
            mine = [cid for cid in order if cid.startswith(f"{n}-")]
            assert mine == sorted(mine), lane


async def test_concurrent_claimers_never_have_two_rows_of_a_lane_in_flight(pg_url: str) -> None:
    await _hammer(pg_url, acceptors=3, claimers=4, lanes=3, rows=15, seed=1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    acceptors=st.integers(1, 3),
    claimers=st.integers(2, 5),
    lanes=st.integers(1, 4),
    rows=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_concurrent_claimers_keep_every_lane_in_order_whatever_the_mix(
    pg_server: PostgresServer, acceptors: int, claimers: int, lanes: int, rows: int, seed: int
) -> None:
    hammer = functools.partial(
        _hammer, acceptors=acceptors, claimers=claimers, lanes=lanes, rows=rows, seed=seed
    )
    trio.run(hammer, pg_server.create_database())


def test_lane_keys_are_validated() -> None:
    from trio_drain import InvalidRequest
    from trio_drain._validate import prepare_row

    bad_keys: list[Any] = ["", "   ", "x" * 257, "a\u202eb", 7]
    for bad in bad_keys:
        with pytest.raises(InvalidRequest, match="ordering_key"):
            prepare_row(attrs.evolve(req("m"), ordering_key=bad), now=0)
    row = prepare_row(attrs.evolve(req("m"), ordering_key="k" * 256), now=0)
    assert row.ordering_key == "k" * 256
    # Not part of the fingerprint: the same request in another lane is the same request.
    other = prepare_row(attrs.evolve(req("m"), ordering_key="other"), now=0)
    assert other.request_fingerprint == row.request_fingerprint


# -- the worker over lanes --------------------------------------------------------------


async def test_a_worker_delivers_each_lane_in_accept_order_through_transient_failures(outbox: Outbox) -> None:
    """Lanes beside free rows, a broker failing one send in five: each lane's
    first acceptances at the broker are in accept order, and no two sends of
    a lane were ever out at once."""
    from trio_drain import SendResult

    from .helpers import FakeBroker, Rig

    rng = random.Random(7)
    out: dict[str, int] = {}
    overlaps: list[str] = []

    def script(message: Any) -> SendResult | None:
        lane = message.client_message_id.split("-")[0]
        if lane.startswith("lane"):
            out[lane] = out.get(lane, 0) + 1
            if out[lane] > 1:
                overlaps.append(lane)
        return SendResult.failed("flaky", permanent=False) if rng.random() < 0.2 else None

    class Counting(FakeBroker):
        async def send(self, message: Any) -> SendResult:
            try:
                return await super().send(message)
            finally:
                lane = message.client_message_id.split("-")[0]
                if lane in out:
                    out[lane] -= 1

    broker = Counting(delay=0.002, script=script)
    await outbox.accept_many(
        [req(f"lane{k}-{i:03d}", mesh="alpha", ordering_key=f"k{k}") for i in range(25) for k in range(4)]
        + [req(f"free-{i:03d}", mesh="alpha") for i in range(50)]
    )
    async with trio.open_nursery() as nursery:
        rig = Rig(outbox, nursery, broker=broker)
        await rig.start()
        await rig.settled(150, seconds=60)
        nursery.cancel_scope.cancel()
    assert overlaps == []
    first_accepted = list(broker.accepted)  # in the order the broker first accepted each
    for k in range(4):
        lane = [cid for cid in first_accepted if cid.startswith(f"lane{k}-")]
        assert lane == sorted(lane) and len(lane) == 25
    assert (await outbox.counts())["done"] == 150


async def test_a_pause_mid_drain_stops_new_sends_of_that_route_only_across_workers(outbox: Outbox) -> None:
    """Two workers drain two meshes; alpha is paused mid-way: within a
    second no new alpha row leaves (through either worker), beta keeps
    going, no attempt is spent; after the resume alpha finishes."""
    from .helpers import FakeBroker, Rig, wait_until

    broker = FakeBroker(delay=0.005)
    await outbox.accept_many(
        [req(f"a-{i:03d}", mesh="alpha") for i in range(300)]
        + [req(f"b-{i:04d}", mesh="beta") for i in range(1500)]
    )

    def sent(prefix: str) -> int:
        return len({m.client_message_id for m in broker.received if m.client_message_id.startswith(prefix)})

    async with trio.open_nursery() as nursery:
        rig = Rig(outbox, nursery, broker=broker)
        rig.registry.set_mesh("beta", broker)
        config = attrs.evolve(rig.config, max_inflight=4, batch_size=4)
        workers = [await rig.start(config), await rig.start(config)]
        await wait_until(lambda: sent("a-") >= 20)
        await outbox.pause(mesh="alpha")
        await trio.sleep(1.0)  # honoured within a second, by both workers
        alpha_at_pause, beta_at_pause = sent("a-"), sent("b-")
        await trio.sleep(1.0)
        assert sent("a-") == alpha_at_pause < 300  # nothing more of alpha left
        assert sent("b-") > beta_at_pause, (await outbox.counts(), [w.statistics() for w in workers])
        await outbox.resume(mesh="alpha")
        await rig.settled(1800, seconds=60)
        nursery.cancel_scope.cancel()
    assert sent("a-") == 300
    assert {r.attempts for r in await outbox.list(status=None, limit=2000)} == {1}  # the pause spent none
