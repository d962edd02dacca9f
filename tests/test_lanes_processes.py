"""Ordering lanes seen from outside: `trio-drain run` processes against a
reference broker process that fails a fifth of sends and drops its
connections, a drain SIGKILLed mid-way, and the order the broker accepted
each lane's rows in (its ledger), which must be the order they were
accepted into the outbox.
"""

from __future__ import annotations

from pathlib import Path

import trio

from trio_drain import generate_secret_key, open_outbox

from .builders import req
from .procs import SHORT_LEASES, Broker, counts, query, start_run, stop_all, wait_for_done, write_config

LANES = 12
PER_LANE = 15
FREE = 60
FAULTS = ("--transient-error-rate", "0.2", "--disconnect-every", "97", "--ack-delay", "0.002")


def fill(target: str | Path) -> int:
    """Lanes interleaved in accept order (lane-major would hide a lane
    overtaking another's), and rows with no lane; how many rows."""

    async def go() -> None:
        async with open_outbox(target) as ob:
            for i in range(PER_LANE):
                await ob.accept_many([req(f"l{k:02d}-{i:03d}", ordering_key=f"k{k}") for k in range(LANES)])
            await ob.accept_many([req(f"free-{i:03d}") for i in range(FREE)])

    trio.run(go)
    return LANES * PER_LANE + FREE


def assert_lanes_in_order(broker: Broker) -> None:
    """The broker's first acceptance of each row, lane by lane, is in accept
    order; and the broker accepted every row exactly once."""
    accepted = [
        cid for (cid,) in query(broker.ledger, "SELECT client_message_id FROM accepted ORDER BY rowid")
    ]
    assert len(accepted) == len(set(accepted)) == LANES * PER_LANE + FREE
    for k in range(LANES):
        lane = [cid for cid in accepted if cid.startswith(f"l{k:02d}-")]
        assert lane == sorted(lane), (k, lane)


def test_a_lane_keeps_its_order_through_faults_and_a_sigkill_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    n = fill(db)
    broker = Broker(tmp_path, *FAULTS).start()
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain=SHORT_LEASES)
    first = start_run(db, config, log=tmp_path / "run1.log")
    try:
        wait_for_done(db, n // 3, 60, first)
        first.kill()  # SIGKILL mid-drain: its claims come back through their leases
        first.wait(timeout=10)
        second = start_run(db, config, log=tmp_path / "run2.log")
        wait_for_done(db, n, 120, second)
        stop_all(second)
    finally:
        stop_all(first)
        broker.stop()
    assert counts(db)["done"] == n
    assert_lanes_in_order(broker)


def test_three_drain_processes_on_postgresql_keep_every_lane_in_order(tmp_path: Path, pg_url: str) -> None:
    n = fill(pg_url)
    broker = Broker(tmp_path, *FAULTS).start()
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain=SHORT_LEASES)
    workers = [start_run(pg_url, config, log=tmp_path / f"run{i}.log") for i in range(3)]
    try:
        wait_for_done(pg_url, n // 3, 60, *workers)
        workers[0].kill()
        workers[0].wait(timeout=10)
        wait_for_done(pg_url, n, 120, *workers[1:])
    finally:
        stop_all(*workers)
        broker.stop()
    assert counts(pg_url)["done"] == n
    assert_lanes_in_order(broker)
