"""A soak: accept and drain steadily through a faulty broker, watching for leaks.

A reference broker in its own process drops connections every few hundred
sends and answers some sends with transient errors; this process accepts
rows at a steady rate and drains them with a `DrainWorker`, sampling its
open file descriptors, Trio tasks and resident memory every second. At the
end every accepted row must be done, and the last quarter of the samples
must sit no higher than the second quarter (after warm-up) beyond a small
allowance.

    python -m tests.soak --seconds 600      # what `nox -s soak` runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from trio_drain import (
    BrokerRegistry,
    DrainConfig,
    DrainWorker,
    MeshIdentity,
    SendRequest,
    WebSocketBroker,
    generate_secret_key,
    open_outbox,
)

from .benchmark import BrokerProcess
from .helpers import wait_settled

CONFIG = DrainConfig(
    max_inflight=64,
    batch_size=128,
    poll_interval=0.2,
    lease=6.0,
    ack_timeout=2.0,
    maintenance_interval=1.0,
    backoff_base=0.05,
    backoff_cap=0.5,
)
PAGE = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class Sample:
    at: float
    fds: int
    tasks: int
    rss_mb: float
    done: int


def count_tasks() -> int:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    n = 0
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def soak(seconds: float, rate: int = 1500) -> dict[str, Any]:
    """Run for `seconds`; return the report (raises AssertionError on a failure)."""
    identity = MeshIdentity(mesh_id="mesh-soak", member_id="soak", secret_key=generate_secret_key())
    samples: list[Sample] = []
    accepted = 0
    with (
        tempfile.TemporaryDirectory(prefix="trio-drain-soak-") as folder,
        BrokerProcess("--disconnect-every", "700", "--transient-error-rate", "0.01") as broker,
    ):
        async with (
            open_outbox(Path(folder) / "o.db", durability="normal") as outbox,
            trio.open_nursery() as nursery,
        ):
            client = WebSocketBroker(
                broker.url,
                identity,
                reconnect_backoff=(0.05, 0.2),
                ack_timeout=2.0,
                ping_interval=1.0,
                pong_timeout=1.0,
            )
            await nursery.start(client.run)
            registry = BrokerRegistry()
            registry.set_mesh("soak", client)
            worker = DrainWorker(outbox, registry, CONFIG)
            await nursery.start(worker.run)

            async def produce() -> None:
                nonlocal accepted
                batch = max(1, rate // 20)
                while True:
                    await outbox.accept_many(
                        [
                            SendRequest(
                                mesh="soak",
                                target_spec="#soak",
                                payload=b"x" * 200,
                                client_message_id=f"s-{accepted + i}",
                            )
                            for i in range(batch)
                        ]
                    )
                    accepted += batch
                    await trio.sleep(0.05)

            async def sample() -> None:
                start = trio.current_time()
                while True:
                    counts = await outbox.counts()
                    samples.append(
                        Sample(trio.current_time() - start, fds(), count_tasks(), rss_mb(), counts["done"])
                    )
                    await trio.sleep(1.0)

            async with trio.open_nursery() as inner:
                inner.start_soon(produce)
                inner.start_soon(sample)
                await trio.sleep(seconds)
                inner.cancel_scope.cancel()

            counts = await wait_settled(outbox, accepted, among=("done", "dead"), seconds=60)
            stats = worker.statistics()
            nursery.cancel_scope.cancel()
    report = _report(samples, accepted, counts, stats.retried, seconds)
    return report


def _report(
    samples: list[Sample], accepted: int, counts: dict[str, int], retried: int, seconds: float
) -> dict[str, Any]:
    quarter = max(1, len(samples) // 4)
    early = samples[quarter : 2 * quarter]
    late = samples[-quarter:]

    def median(rows: list[Sample], field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in rows))

    growth = {f: median(late, f) - median(early, f) for f in ("fds", "tasks", "rss_mb")}
    report = {
        "seconds": seconds,
        "accepted": accepted,
        "counts": counts,
        "retried": retried,
        "samples": len(samples),
        "growth_late_vs_early": growth,
        "peak": {
            "fds": max(s.fds for s in samples),
            "tasks": max(s.tasks for s in samples),
            "rss_mb": max(s.rss_mb for s in samples),
        },
    }
    assert counts["done"] == accepted and counts["dead"] == 0, report
    assert growth["fds"] <= 4, f"file descriptors grew: {report}"
    assert growth["tasks"] <= 16, f"tasks grew: {report}"
    assert growth["rss_mb"] <= max(16.0, 0.15 * median(early, "rss_mb")), f"memory grew: {report}"
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=int, default=1500, help="rows accepted a second")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the injected disconnects would fill the screen
    started = time.monotonic()
    result = trio.run(soak, ns.seconds, ns.rate)
    print(json.dumps(result, indent=2))
    print(f"soak passed in {time.monotonic() - started:.0f}s", file=sys.stderr)
