"""Hosts whose clocks are off, sharing one PostgreSQL outbox.

Leases, due times and max_age are the database server's to judge
(section 6 of the spec): a host whose clock runs ten minutes fast must not
take another host's live lease (a duplicate send) nor kill young rows as
expired, and one running ten minutes slow must not hold rows back.

Each host is an outbox opened with a skewed `clock`, the parameter
`open_outbox` offers; a process-level test under `faketime` would need that
tool, which the test machines lack.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import attrs
import pytest
import trio

from trio_drain import DrainConfig, Outbox, Status, open_outbox
from trio_drain import _lifecycle as lc
from trio_drain._clock import wall_clock_ms

from .builders import BIG, req
from .helpers import FakeBroker, Rig, wait_settled

MINUTES_10 = 10 * 60 * 1000
LEASE = 60_000


def fast() -> int:
    return wall_clock_ms() + MINUTES_10


def slow() -> int:
    return wall_clock_ms() - MINUTES_10


@attrs.frozen
class Hosts:
    fast: Outbox  # its clock runs ten minutes ahead
    right: Outbox
    slow: Outbox  # ten minutes behind


@pytest.fixture
async def hosts(pg_url: str) -> AsyncIterator[Hosts]:
    async with AsyncExitStack() as stack:
        yield Hosts(
            *[
                await stack.enter_async_context(open_outbox(pg_url, clock=clock))
                for clock in (fast, wall_clock_ms, slow)
            ]
        )


async def test_a_fast_host_neither_takes_live_leases_nor_expires_young_rows(hosts: Hosts) -> None:
    await hosts.right.accept_many([req(f"m-{i}") for i in range(6)])
    held = await hosts.right.claim(limit=3, lease_ms=LEASE, max_age_ms=BIG, token="right")
    assert len(held) == 3
    # Ten minutes ahead, a host's own clock says those leases ran out long ago
    # and the rows (accepted a moment ago) are past a five-minute max_age.
    assert await hosts.fast.recover_expired_leases(max_attempts=25) == 0
    assert await hosts.fast.expire_stale(max_age_ms=5 * 60 * 1000) == 0
    taken = await hosts.fast.claim(limit=10, lease_ms=LEASE, max_age_ms=5 * 60 * 1000, token="fast")
    assert sorted(r.client_message_id for r in taken) == ["m-3", "m-4", "m-5"]
    for row in held:
        now = await hosts.right.get(row.id)
        assert now is not None and (now.status, now.lease_token) == (Status.INFLIGHT, "right")
    assert await hosts.right.counts() == {"pending": 0, "inflight": 6, "done": 0, "dead": 0, "aborted": 0}


async def test_rows_are_stamped_and_leased_by_the_servers_clock(hosts: Hosts) -> None:
    for name, host in (("f", hosts.fast), ("r", hosts.right), ("s", hosts.slow)):
        await host.accept(req(f"{name}-1"))
    rows = await hosts.right.list(limit=10)
    # One timeline whichever host accepted: no row ten minutes off.
    assert max(r.enqueued_at for r in rows) - min(r.enqueued_at for r in rows) < 5_000
    assert all(r.next_attempt_at == r.enqueued_at for r in rows)
    (claimed,) = await hosts.fast.claim(limit=1, lease_ms=LEASE, max_age_ms=BIG, token="fast")
    assert claimed.lease_expires_at is not None
    assert abs(claimed.lease_expires_at - (wall_clock_ms() + LEASE)) < 5_000


async def test_a_slow_host_does_not_hold_rows_back(hosts: Hosts) -> None:
    # Rows accepted by hosts ahead of it are due now, by the server's clock.
    await hosts.right.accept_many([req(f"r-{i}") for i in range(3)])
    await hosts.fast.accept_many([req(f"f-{i}") for i in range(3)])
    rows = await hosts.slow.claim(limit=10, lease_ms=LEASE, max_age_ms=BIG, token="slow")
    assert sorted(r.client_message_id for r in rows) == ["f-0", "f-1", "f-2", "r-0", "r-1", "r-2"]


async def test_retry_times_follow_the_servers_clock_whoever_wrote_them(hosts: Hosts) -> None:
    delay = 5_000
    policy = lc.RetryPolicy(backoff_base_ms=delay, backoff_cap_ms=delay)
    await hosts.right.accept_many([req("by-fast", priority="now"), req("by-slow")])
    (fast_row,) = await hosts.fast.claim(limit=1, lease_ms=LEASE, max_age_ms=BIG, token="fast")
    # (Claimed for the slow host by one whose clock is right: a slow host's
    # own claims are the test above.)
    (slow_row,) = await hosts.right.claim(limit=1, lease_ms=LEASE, max_age_ms=BIG, token="slow")
    assert (fast_row.client_message_id, slow_row.client_message_id) == ("by-fast", "by-slow")
    # Each host backs its row off five seconds by its own clock: taken as it
    # stands, a fast host's retry would wait ten minutes more, a slow host's
    # would be due at once. (One writes through `complete`, the other
    # through `complete_and_claim`, as the worker does.)
    before = wall_clock_ms()
    assert await hosts.fast.complete(
        [lc.on_error(fast_row, error="x", permanent=False, now=hosts.fast.clock(), policy=policy, jitter=1.0)]
    ) == [True]
    applied, _ = await hosts.slow.complete_and_claim(
        [
            lc.on_error(
                slow_row, error="x", permanent=False, now=hosts.slow.clock(), policy=policy, jitter=1.0
            )
        ],
        limit=0,
        lease_ms=LEASE,
        max_age_ms=BIG,
        token="slow-2",
    )
    after = wall_clock_ms()
    assert applied == [True]
    retries = await hosts.right.list(Status.PENDING)
    assert len(retries) == 2
    for row in retries:  # the server's clock is this machine's
        assert before + delay - 50 <= row.next_attempt_at <= after + delay + 2_000, (row, before, after)
    assert await hosts.right.claim(limit=10, lease_ms=LEASE, max_age_ms=BIG, token="right") == []
    # Each host sleeps until the retry is due by its own clock, not ten
    # minutes too long or too short.
    first = min(r.next_attempt_at for r in retries)
    fast_due = await hosts.fast.next_due_at(max_age_ms=BIG)
    slow_due = await hosts.slow.next_due_at(max_age_ms=BIG)
    assert fast_due is not None and abs(fast_due - MINUTES_10 - first) < 1_000
    assert slow_due is not None and abs(slow_due + MINUTES_10 - first) < 1_000


async def test_claimers_on_skewed_hosts_never_take_a_row_twice(hosts: Hosts) -> None:
    n = 240
    await hosts.slow.accept_many([req(f"s-{i}") for i in range(n // 3)])
    await hosts.fast.accept_many([req(f"f-{i}") for i in range(n // 3)])
    await hosts.right.accept_many([req(f"r-{i}") for i in range(n // 3)])
    claims: dict[str, list[str]] = {}

    async def claimer(name: str, ob: Outbox) -> None:
        for k in range(1000):
            # Every round sweeps leases, as each worker's maintenance does.
            await ob.recover_expired_leases(max_attempts=25)
            rows = await ob.claim(limit=4, lease_ms=LEASE, max_age_ms=BIG, token=f"{name}-{k}")
            for row in rows:
                claims.setdefault(row.client_message_id, []).append(name)
            if not rows and len(claims) == n:
                return
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for name, ob in (("fast", hosts.fast), ("right", hosts.right), ("slow", hosts.slow)):
            for i in range(2):
                nursery.start_soon(claimer, f"{name}{i}", ob)
    assert len(claims) == n
    twice = {cid: who for cid, who in claims.items() if len(who) > 1}
    assert not twice, twice
    assert (await hosts.right.counts())["inflight"] == n


async def test_workers_on_hosts_whose_clocks_are_off_send_each_row_once(pg_url: str) -> None:
    # A worker ten minutes fast drains its share quickly, then sweeps leases
    # every 0.1 s while a worker with the right clock holds rows in flight
    # for a second under a 5 s lease.
    config = DrainConfig(
        poll_interval=0.05, lease=5.0, ack_timeout=3.0, maintenance_interval=0.1, max_inflight=8, batch_size=8
    )
    n = 40
    brokers = {"fast": FakeBroker(delay=0.02), "right": FakeBroker(delay=1.0)}
    async with open_outbox(pg_url, clock=fast) as ob_fast, open_outbox(pg_url) as ob_right:
        await ob_right.accept_many([req(f"m-{i}") for i in range(n)])
        async with trio.open_nursery() as nursery:
            for name, ob in (("fast", ob_fast), ("right", ob_right)):
                await Rig(ob, nursery, brokers[name], config=config).start()
            await wait_settled(ob_right, n, among=("done",), seconds=20)
            nursery.cancel_scope.cancel()
    sent = Counter(m.client_message_id for b in brokers.values() for m in b.received)
    assert set(sent) == {f"m-{i}" for i in range(n)}
    assert not [cid for cid, times in sent.items() if times > 1], "rows went out twice"
    assert all(b.received for b in brokers.values())  # both did their share
