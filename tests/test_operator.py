"""An operator's reads and actions on a real outbox, on SQLite and PostgreSQL:
listings filtered and paged, rows named by a prefix of their id, bulk
requeue and drop by filter (each row's change the state machine's, in
bounded batches, recorded and logged), prune by status and age."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

import trio_drain._operator
from trio_drain import InvalidRequest, OutboxRow, Status
from trio_drain import _lifecycle as lc
from trio_drain._outbox import Outbox
from trio_drain._store._reads import RowFilter

from .builders import BIG, req
from .helpers import FakeClock
from .operator_rows import MINUTE, POLICY, a_mixed_outbox, kill


def cids(rows: Sequence[OutboxRow]) -> list[str]:
    return [r.client_message_id for r in rows]


# -- listing


async def test_list_filters_by_status_mesh_lane_error_and_age(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await a_mixed_outbox(ob, clock)
    assert cids(await ob.list("dead")) == ["b-dead", "a-dead-2", "a-dead-1"]
    assert cids(await ob.list(["dead", Status.PENDING], mesh="beta")) == ["b-pend", "b-dead"]
    assert cids(await ob.list(lane="conv")) == ["c-1", "c-0"]
    assert cids(await ob.list(error="forbidden")) == ["b-dead", "a-dead-1"]
    assert cids(await ob.list(error="Forbidden")) == []  # case-sensitive, as documented
    assert cids(await ob.list(error="%")) == []  # a plain substring: no LIKE wildcards
    # Rows were accepted a minute apart, from 10 minutes ago to 4 minutes ago.
    clock.advance(3 * MINUTE)
    assert cids(await ob.list(older_than=6.5 * 60)) == ["a-pend", "b-dead", "a-dead-2", "a-dead-1"]
    assert cids(await ob.list(older_than=6.5 * 60, oldest_first=True, limit=2)) == ["a-dead-1", "a-dead-2"]
    assert await ob.count("dead", error="forbidden") == 2
    assert await ob.count() == 7
    with pytest.raises(InvalidRequest):
        await ob.list("stuck")
    with pytest.raises(InvalidRequest):
        await ob.list(error="")
    with pytest.raises(InvalidRequest):
        await ob.list(older_than=-1)


async def test_paging_by_row_visits_every_row_once_even_when_rows_share_a_time(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i:02}") for i in range(23)])  # one enqueued_at for all
    clock.advance(1)
    await ob.accept_many([req(f"n-{i:02}") for i in range(4)])
    for oldest_first in (False, True):
        seen: list[str] = []
        cursor: OutboxRow | None = None
        while True:
            if oldest_first:
                page = await ob.list(limit=5, after=cursor, oldest_first=True)
            else:
                page = await ob.list(limit=5, before=cursor)
            if not page:
                break
            seen.extend(cids(page))
            cursor = page[-1]
        assert sorted(seen) == sorted(f"m-{i:02}" for i in range(23)) + [f"n-{i:02}" for i in range(4)]
        assert len(seen) == len(set(seen)) == 27
        assert seen[0] == ("m-00" if oldest_first else "n-03")


# -- naming rows


async def test_short_ids_are_unique_prefixes_that_find_their_row(clocked_outbox: Outbox) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i}") for i in range(30)])  # ids that differ only at the end
    for i in range(5):
        await ob.accept(req(f"lone-{i}"))
    rows = await ob.list(limit=100)
    short = await ob.short_ids([r.id for r in rows])
    for row in rows:
        prefix = short[row.id]
        assert len(prefix) >= 8 and row.id.startswith(prefix)
        assert [r.id for r in await ob.get_by_id_prefix(prefix)] == [row.id]
    assert len(await ob.get_by_id_prefix(rows[0].id[:8])) > 1  # the shared head of a batch's ids


# -- bulk requeue and drop


async def test_requeue_matching_requeues_the_dead_rows_it_matches_and_records_who(
    clocked_outbox: Outbox, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ob = clocked_outbox
    await a_mixed_outbox(ob, clock)
    with caplog.at_level(logging.INFO, logger="trio_drain.operator"):
        assert await ob.requeue_matching("dead", error="forbidden", by="alice") == 2
    for cid in ("a-dead-1", "b-dead"):
        old = await ob.get_by_client_id(cid)
        assert old is not None and old.status is Status.ABORTED and old.aborted_by == "alice"
        new = await ob.get(old.superseded_by or "")
        assert new is not None and new.status is Status.PENDING and new.payload == old.payload
    untouched = await ob.get_by_client_id("a-dead-2")
    assert untouched is not None and untouched.status is Status.DEAD
    assert (await ob.counts())["pending"] == 4 + 2
    assert any("requeued 2 row(s)" in r.getMessage() and "alice" in r.getMessage() for r in caplog.records)


async def test_bulk_actions_refuse_no_filter_and_states_they_cannot_take(clocked_outbox: Outbox) -> None:
    ob = clocked_outbox
    await ob.accept(req("m-1"))
    with pytest.raises(InvalidRequest, match="filter"):
        await ob.requeue_matching()
    with pytest.raises(InvalidRequest, match="filter"):
        await ob.drop_matching(by="x")
    with pytest.raises(InvalidRequest, match="done"):
        await ob.requeue_matching("done")
    with pytest.raises(InvalidRequest, match="inflight"):
        await ob.drop_matching(["dead", "inflight"])
    assert (await ob.counts())["pending"] == 1


async def test_a_filter_without_status_takes_pending_and_dead_rows_not_inflight_ones(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await a_mixed_outbox(ob, clock)
    (inflight,) = await ob.claim(limit=1, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="w")
    assert inflight.mesh == "alpha"
    # alpha: a-dead-1, a-dead-2, then the pending rows (c-1 waits behind c-0).
    assert await ob.drop_matching(mesh="alpha", by="bob") == 4
    still = await ob.get(inflight.id)
    assert still is not None and still.status is Status.INFLIGHT  # a worker's row
    assert await ob.requeue_matching("inflight", mesh="alpha") == 1
    counts = await ob.counts()
    assert counts["inflight"] == 0 and counts["dead"] == 1  # beta's


async def test_bulk_requeue_in_batches_changes_each_row_once_and_leaves_its_copies_alone(
    clocked_outbox: Outbox, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ob = clocked_outbox
    monkeypatch.setattr(trio_drain._operator, "CHANGE_BATCH", 7)
    await ob.accept_many([req(f"m-{i:02}") for i in range(40)])  # one enqueued_at, and the clock stands
    assert await ob.requeue_matching("pending", mesh="alpha") == 40
    counts = await ob.counts()
    assert (counts["aborted"], counts["pending"]) == (40, 40)
    # The copies match the filter too; a second run takes them, and only them.
    assert await ob.requeue_matching("pending", mesh="alpha") == 40
    assert (await ob.counts())["aborted"] == 80


async def test_bulk_requeue_of_a_lane_keeps_its_order_and_one_row_in_flight(
    clocked_outbox: Outbox, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ob = clocked_outbox
    monkeypatch.setattr(trio_drain._operator, "CHANGE_BATCH", 2)
    for i in range(5):
        await ob.accept(req(f"k-{i}", ordering_key="k"))
        clock.advance(1)
    assert await ob.requeue_matching(lane="k") == 5
    order = []
    for _ in range(5):
        (head,) = await ob.claim(limit=10, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="t")
        old = await ob.list("aborted", lane="k", limit=10)
        order.append(next(r.client_message_id for r in old if r.superseded_by == head.id))
        await ob.complete([lc.on_ack(head, broker_message_id="b", now=clock.now)])
    assert order == [f"k-{i}" for i in range(5)]


async def test_bulk_drop_of_a_lane_head_lets_the_next_row_go(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    for i in range(3):
        await ob.accept(req(f"k-{i}", ordering_key="k", mesh="alpha" if i == 0 else "beta"))
        clock.advance(1)
    assert await ob.drop_matching(mesh="alpha") == 1
    (head,) = await ob.claim(limit=10, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="t")
    assert head.client_message_id == "k-1"


async def test_a_row_that_changed_since_it_was_chosen_is_skipped(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept(req("m-1"))
    (chosen,) = await ob.list("pending")
    await ob.claim(limit=1, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="t")  # a worker took it meanwhile
    where = RowFilter(statuses=frozenset({Status.PENDING, Status.DEAD}))
    assert await ob.backend.drop_many([chosen.id], now=clock.now, by="x", where=where) == []
    assert (
        await ob.backend.requeue_many([chosen.id], now=clock.now, new_ids=[("n", "c")], by="x", where=where)
        == []
    )
    row = await ob.get(chosen.id)
    assert row is not None and row.status is Status.INFLIGHT


# -- prune


async def test_prune_takes_done_rows_by_default_and_dead_or_aborted_on_request(
    clocked_outbox: Outbox, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ob = clocked_outbox
    monkeypatch.setattr(trio_drain._operator, "PRUNE_BATCH", 2)
    await ob.accept_many([req(f"d-{i}") for i in range(5)])
    rows = await ob.claim(limit=5, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="t")
    await ob.complete([lc.on_ack(r, broker_message_id="b", now=clock.now) for r in rows])
    await ob.accept(req("dead-1"))
    clock.advance(1)
    await kill(ob, clock, "dead-1", "forbidden")
    await ob.accept(req("gone-1"))
    gone = await ob.get_by_client_id("gone-1")
    assert gone is not None
    await ob.drop(gone.id)
    clock.advance(10 * MINUTE)
    await ob.accept(req("young"))
    young = await ob.claim(limit=1, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="u")
    await ob.complete([lc.on_ack(young[0], broker_message_id="b", now=clock.now)])

    assert await ob.prune(older_than=5 * 60) == 5  # done rows only, in batches of 2; "young" stays
    assert await ob.prune(5 * 60, status=["dead", "aborted"]) == 2
    assert await ob.counts() == {"pending": 0, "inflight": 0, "done": 1, "dead": 0, "aborted": 0}
    with pytest.raises(InvalidRequest, match="pending"):
        await ob.prune(0, status="pending")


async def test_bulk_requeue_over_several_statuses_takes_rows_in_accept_order(
    clocked_outbox: Outbox, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ob = clocked_outbox
    monkeypatch.setattr(trio_drain._operator, "CHANGE_BATCH", 2)
    for i in range(8):
        await ob.accept(req(f"m-{i}"))
        clock.advance(1)
    for i in (0, 3, 4, 7):  # dead ones among the pending
        await kill(ob, clock, f"m-{i}", "forbidden")
    assert await ob.requeue_matching(["pending", "dead"], mesh="alpha") == 8
    aborted = await ob.list("aborted", limit=10, oldest_first=True)
    assert cids(aborted) == [f"m-{i}" for i in range(8)]
    # Copies are minted in the order rows are changed: the same order.
    successors = [r.superseded_by or "" for r in aborted]
    assert successors == sorted(successors)
