"""Ordering lanes in the benchmark (SPEC section 9), every figure a ratio
taken within one run:

- many lanes: 1,000 lanes of 100 rows against the same rows with no key,
  drained by the default worker through a broker process, interleaved
  rounds on fresh outboxes, the median of the per-round ratios;
- one lane: its rows a second against 1/RTT, the round trips a second of
  one send at a time over one connection with no database, measured in the
  same round, at a few ack delays;
- claim cost: a claim-and-complete cycle over 1,000,000 pending rows in
  lanes against 10,000, alternating, on one outbox each.

Run: `nox -s bench -- --only lanes` (`--quick` for a smaller run).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import trio

from trio_drain import DrainConfig, OutgoingMessage, SendRequest, open_outbox
from trio_drain import _lifecycle as lc

from .benchmark import BrokerProcess, connected, drain_rate


def _requests(prefix: str, lanes: int, per_lane: int, keyed: bool) -> list[SendRequest]:
    """Lane-interleaved, as a busy host accepts them."""
    return [
        SendRequest(
            mesh="bench",
            target_spec="#bench",
            payload=b"hello world",
            client_message_id=f"{prefix}-{k:05d}-{i:04d}",
            ordering_key=f"k{k}" if keyed else None,
        )
        for i in range(per_lane)
        for k in range(lanes)
    ]


async def _fill(db: str, requests: list[SendRequest]) -> None:
    async with open_outbox(db, durability="normal") as outbox:
        for start in range(0, len(requests), 10_000):
            await outbox.accept_many(requests[start : start + 10_000])


async def _round_trips(url: str, n: int) -> float:
    """1/RTT: one send at a time over one connection, no database."""
    async with trio.open_nursery() as nursery:
        broker = await connected(nursery, url)
        started = time.perf_counter()
        for i in range(n):
            result = await broker.send(
                OutgoingMessage(
                    client_message_id=f"rt-{time.time_ns()}-{i}",
                    request_fingerprint="ab" * 32,
                    target_spec="#bench",
                    priority="next",
                    nonce="bm9uY2U=",
                    ciphertext="aGVsbG8gd29ybGQ=",
                )
            )
            assert result.ok
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return n / elapsed


async def many_lanes(folder: str, *, lanes: int, per_lane: int, runs: int) -> dict[str, Any]:
    """The same rows with and without keys, interleaved; each round fresh."""
    config = DrainConfig()
    n = lanes * per_lane
    keyed: list[float] = []
    free: list[float] = []
    with BrokerProcess("--ack-delay", "0.001") as broker:
        for r in range(runs):
            for is_keyed, rates in ((True, keyed), (False, free)):
                db = os.path.join(tempfile.mkdtemp(dir=folder), "o.db")
                await _fill(db, _requests(f"{r}{is_keyed:d}", lanes, per_lane, is_keyed))
                rates.append(await drain_rate(broker.url, db, n, config))
    ratios = [k / f for k, f in zip(keyed, free, strict=True)]
    return {
        "lanes": lanes,
        "per_lane": per_lane,
        "keyed_rps": keyed,
        "free_rps": free,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


async def one_lane(folder: str, *, rows: int, delays_ms: tuple[int, ...], runs: int) -> dict[str, Any]:
    """A single lane's rows a second against 1/RTT at each ack delay."""
    out: dict[str, Any] = {}
    for delay in delays_ms:
        lane: list[float] = []
        rtt: list[float] = []
        with BrokerProcess("--ack-delay", str(delay / 1000)) as broker:
            for r in range(runs):
                rtt.append(await _round_trips(broker.url, rows))
                db = os.path.join(tempfile.mkdtemp(dir=folder), "o.db")
                await _fill(db, _requests(f"one{r}", 1, rows, True))
                lane.append(await drain_rate(broker.url, db, rows, DrainConfig()))
        ratios = [a / b for a, b in zip(lane, rtt, strict=True)]
        out[f"{delay}ms"] = {
            "lane_rps": lane,
            "round_trips_per_s": rtt,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
        }
    return out


async def claim_cost(folder: str, *, big: int, small: int, per_lane: int, cycles: int) -> dict[str, Any]:
    """Claim-and-complete cycles of 32 (the worker's shape: outcomes written
    and the freed heads' successors claimed in one transaction) over a big
    and a small backlog in lanes, alternating."""
    outboxes = {}
    for name, n in (("big", big), ("small", small)):
        db = os.path.join(tempfile.mkdtemp(dir=folder), "o.db")
        await _fill(db, _requests(name, n // per_lane, per_lane, True))
        outboxes[name] = db
    spent: dict[str, list[float]] = {"big": [], "small": []}
    async with (
        open_outbox(outboxes["big"], durability="normal") as big_ob,
        open_outbox(outboxes["small"], durability="normal") as small_ob,
    ):
        pair = (("big", big_ob), ("small", small_ob))
        held: dict[str, list[Any]] = {}
        for name, ob in pair:
            held[name] = list(await ob.claim(limit=32, lease_ms=60_000, max_age_ms=10**12, token="t0"))
        for cycle in range(cycles):
            for name, ob in pair:
                done = [lc.on_ack(row, broker_message_id="b", now=0) for row in held[name]]
                started = time.perf_counter()
                _, rows = await ob.complete_and_claim(
                    done, limit=32, lease_ms=60_000, max_age_ms=10**12, token=f"t{cycle + 1}"
                )
                spent[name].append(time.perf_counter() - started)
                held[name] = list(rows)
    big_ms = statistics.median(spent["big"]) * 1000
    small_ms = statistics.median(spent["small"]) * 1000
    return {
        "big_rows": big,
        "small_rows": small,
        "big_ms": big_ms,
        "small_ms": small_ms,
        "ratio": big_ms / small_ms,
    }


async def lanes(quick: bool, runs: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="trio-drain-bench-lanes-")
    return {
        "many": await many_lanes(
            folder, lanes=200 if quick else 1000, per_lane=25 if quick else 100, runs=max(2, runs)
        ),
        "one": await one_lane(folder, rows=200 if quick else 500, delays_ms=(1, 5, 20), runs=max(2, runs)),
        "claim": await claim_cost(
            folder,
            big=100_000 if quick else 1_000_000,
            small=10_000,
            per_lane=100,
            cycles=100 if quick else 300,
        ),
    }


def lanes_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Table rows: (figure, measured, target)."""
    lanes_r = r["lanes"]
    many, one, claim = lanes_r["many"], lanes_r["one"], lanes_r["claim"]
    rows = [
        (
            f"{many['lanes']:,} lanes of {many['per_lane']} vs the same rows without keys (rows/s, median ratio)",
            f"{statistics.median(many['keyed_rps']):,.0f} / {statistics.median(many['free_rps']):,.0f}"
            f" = {many['ratio']:.2f}",
            ">= 0.8",
        )
    ]
    for delay, figures in one.items():
        rows.append(
            (
                f"one lane vs 1/RTT at {delay} ack delay (rows/s vs round trips/s, median ratio)",
                f"{statistics.median(figures['lane_rps']):,.0f} / {statistics.median(figures['round_trips_per_s']):,.0f}"
                f" = {figures['ratio']:.2f}",
                ">= 0.8",
            )
        )
    rows.append(
        (
            f"claim+complete of 32 in lanes, {claim['big_rows']:,} vs {claim['small_rows']:,} pending (ms)",
            f"{claim['big_ms']:.2f} / {claim['small_ms']:.2f} = {claim['ratio']:.2f}",
            "flat (~1.0)",
        )
    )
    return rows
