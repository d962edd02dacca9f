"""What `Outbox.overview` reads for `top` and the metrics, on both back ends,
and how `OverviewSampler` paces its costly parts."""

from __future__ import annotations

import functools

import attrs
import trio
import trio.testing

from trio_drain import Outbox, Status
from trio_drain import _lifecycle as lc
from trio_drain._metrics._sampler import OverviewSampler
from trio_drain._store._overview import NO_ROUTE, Overview, RouteRows

from . import builders
from .builders import BIG
from .helpers import FakeClock

req = functools.partial(builders.req, target_spec="*")
SESSION = "ab" * 32


async def test_an_empty_outbox_has_zero_counts_and_no_oldest_row(outbox: Outbox) -> None:
    found = await outbox.overview()
    assert found.counts == {s.value: 0 for s in Status}
    assert found.oldest_pending_age is None
    assert found.routes == ()
    assert found.newest_dead == ()
    assert found.paused == frozenset()


async def test_the_overview_counts_rows_per_status_and_per_route(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    await ob.accept(req("first", mesh="alpha"))
    clock.advance(1_000)
    await ob.accept_many([req(f"a{i}", mesh="alpha") for i in range(3)])
    await ob.accept_many([req(f"b{i}", mesh="beta") for i in range(2)])
    await ob.accept(req("s", mesh="alpha", sender_session_pubkey=SESSION))
    await ob.accept(req("none", mesh=None))
    clock.advance(4_000)
    # Claimed in priority and enqueue order: "first", then a0 and a1.
    claimed = await ob.claim(limit=3, lease_ms=60_000, max_age_ms=BIG, token="t")
    assert [r.client_message_id for r in claimed] == ["first", "a0", "a1"]
    await ob.complete(
        [
            lc.on_error(
                claimed[0],
                error="refused",
                permanent=True,
                now=clock.now,
                policy=lc.RetryPolicy(),
                jitter=0.0,
            )
        ]
    )
    await ob.pause(mesh="beta")

    found = await ob.overview()
    assert found.counts == {"pending": 5, "inflight": 2, "done": 0, "dead": 1, "aborted": 0}
    assert found.oldest_pending_age == 4.0  # a2, accepted 4 s ago by the outbox's clock
    assert found.paused == {"mesh:beta"}
    assert found.routes == (
        RouteRows(route="mesh:beta", pending=2),
        RouteRows(route="mesh:alpha", pending=1, inflight=2, dead=1),
        RouteRows(route=NO_ROUTE, pending=1),
        RouteRows(route=f"session:{SESSION}", pending=1),
    )
    (dead,) = found.newest_dead
    assert (dead.client_message_id, dead.route, dead.last_error, dead.attempts) == (
        "first",
        "mesh:alpha",
        "refused",
        1,
    )


async def test_the_overview_reads_only_the_parts_asked_for(outbox: Outbox) -> None:
    await outbox.accept(req("x"))
    found = await outbox.overview(counts=False, routes=False, dead_rows=0)
    assert found.counts is None and found.routes is None
    assert found.oldest_pending_age is not None


async def test_the_newest_dead_rows_come_newest_first_and_bounded(
    clocked_outbox: Outbox, clock: FakeClock
) -> None:
    ob = clocked_outbox
    for i in range(7):
        await ob.accept(req(f"d{i}"))
        clock.advance(10)
    rows = await ob.claim(limit=10, lease_ms=60_000, max_age_ms=BIG, token="t")
    await ob.complete(
        [
            lc.on_error(
                r,
                error=f"e{r.client_message_id}",
                permanent=True,
                now=clock.now,
                policy=lc.RetryPolicy(),
                jitter=0.0,
            )
            for r in rows
        ]
    )
    found = await ob.overview(dead_rows=3)
    assert [d.client_message_id for d in found.newest_dead] == ["d6", "d5", "d4"]


# -- the sampler's pace, on a stand-in outbox whose reads take Trio time


@attrs.define
class SlowOutbox:
    """Reads that take `costs[part]` seconds of Trio time; `done` rows done."""

    costs: dict[str, float]
    done: int = 0
    reads: list[tuple[str, float]] = attrs.field(factory=list)

    async def overview(self, *, counts: bool, routes: bool, dead_rows: int) -> Overview:
        part = "counts" if counts else "routes" if routes else "head"
        self.reads.append((part, trio.current_time()))
        await trio.sleep(self.costs[part])
        return Overview(
            counts={"pending": 0, "inflight": 0, "done": self.done, "dead": 0, "aborted": 0}
            if counts
            else None,
            routes=() if routes else None,
            oldest_pending_age=None,
        )


async def test_cheap_parts_are_read_every_interval_and_costly_ones_within_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = SlowOutbox({"head": 0.001, "counts": 0.5, "routes": 2.0})
    sampler = OverviewSampler(slow, interval=1.0, budget=0.05)  # type: ignore[arg-type]
    start = trio.current_time()
    while trio.current_time() - start < 100:
        await sampler.refresh()
        await trio.sleep_until(max(start, sampler.next_due()))
    reads = {part: [at for p, at in slow.reads if p == part] for part in ("head", "counts", "routes")}
    assert 90 <= len(reads["head"]) <= 101  # every second
    # 0.5 s of counting at most 5% of the time: every 10 s; 2 s of routes: every 40 s.
    assert 9 <= len(reads["counts"]) <= 11
    assert 2 <= len(reads["routes"]) <= 3
    spent = 0.5 * len(reads["counts"]) + 2.0 * len(reads["routes"])
    assert spent / (trio.current_time() - start) < 0.11  # two costly parts, 5% each


async def test_delivered_per_second_comes_from_successive_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = SlowOutbox({"head": 0.0, "counts": 0.0, "routes": 0.0})
    sampler = OverviewSampler(slow, interval=1.0)  # type: ignore[arg-type]
    first = await sampler.refresh()
    assert first.delivered_per_second is None
    await trio.sleep(2.0)
    slow.done = 500
    second = await sampler.refresh()
    assert second.delivered_per_second == 250.0
    await trio.sleep(1.0)
    slow.done = 100  # pruned meanwhile: no rate rather than a negative one
    third = await sampler.refresh()
    assert third.delivered_per_second is None
