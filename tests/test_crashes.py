"""Crashes, Jepsen style: drain processes killed with SIGKILL, at random and at
named points, brokers killed and restarted, several processes on one outbox;
then every id is accounted for.

The accounting: the broker's receipts file has a line per send frame it
received, its ledger one row per message it accepted. Lost = ids not done
in the outbox (must be 0); duplicate effects = ledger rows beyond one per id
(must be 0, and each outbox row's broker_message_id must be the ledger's);
retransmissions = receipts beyond one per id, bounded by what was in flight
at each kill.

The long crash loop is `nox -s crash` (TRIO_DRAIN_CRASH_LOOPS kills); the
default suite runs a short one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trio_drain._brokers._identity import generate_secret_key
from trio_drain._crashpoints import ENV, POINTS

from .procs import (
    CLI,
    SHORT_LEASES,
    Broker,
    counts,
    fill,
    query,
    start_run,
    statuses,
    stop_all,
    wait_for_done,
    write_config,
)

MAX_INFLIGHT = 16
CRASHY = {"max_inflight": MAX_INFLIGHT, **SHORT_LEASES}


def integrity(db: Path) -> str:
    return "; ".join(r[0] for r in query(db, "PRAGMA integrity_check"))


def account(db: Path, broker: Broker, n: int, kills: int) -> dict[str, Any]:
    """Every id: delivered once, recorded with the broker's own message id."""
    ids = {f"r-{i}" for i in range(n)}
    rows = statuses(db, "broker_message_id")
    lost = sorted(cid for cid in ids if rows[cid][0] != "done")
    accepted = broker.accepted()
    wrong = sorted(cid for cid in ids if accepted.get(cid) != rows[cid][1])
    sent = broker.sent()
    resent = sum(c - 1 for c in sent.values())
    report = {
        "lost": lost[:5],
        "n_lost": len(lost),
        "wrong_message_id": wrong[:5],
        "effects": len(accepted),
        "resent": resent,
        "kills": kills,
    }
    assert not lost, report
    assert set(accepted) == ids and not wrong, report
    assert set(sent) == ids, report
    # Only a send in flight when something died can go out twice.
    assert resent <= kills * MAX_INFLIGHT, report
    return report


def drain_to_the_end(db: Path, config: Path, n: int) -> None:
    worker = start_run(db, config)
    try:
        wait_for_done(db, n, 120, worker)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0 and "Traceback" not in err, err


# -- named kill points ---------------------------------------------------------------------------

KILL_AT = {
    "claim_before_commit": "claim_before_commit@3",
    "claim_after_commit": "claim_after_commit@3",
    "send_left": "send_left@3",
    "ack_before_record": "ack_before_record@10",
    "completion_mid_batch": "completion_mid_batch@2",
}
assert set(KILL_AT) == POINTS


@pytest.mark.parametrize("point", sorted(KILL_AT))
def test_a_kill_at_a_named_point_loses_nothing_and_applies_nothing_twice(tmp_path: Path, point: str) -> None:
    n = 300
    db = tmp_path / "o.db"
    fill(db, n)
    broker = Broker(tmp_path, "--ack-delay", "0.005").start()
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain=CRASHY)
    try:
        crashing = subprocess.Popen(
            [*CLI, "run", "--db", str(db), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, ENV: KILL_AT[point]},
        )
        _, err = crashing.communicate(timeout=60)
        assert crashing.returncode == -signal.SIGKILL, f"never reached {point}: {err}"
        assert integrity(db) == "ok"
        assert counts(db)["done"] < n, "the kill came before the end"
        drain_to_the_end(db, config, n)
    finally:
        broker.stop()
    account(db, broker, n, kills=1)


# -- the crash loop ------------------------------------------------------------------------------


def crash_loop(folder: Path, *, kills: int, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    db = folder / "o.db"
    fill(db, n)
    # A 20 ms ack delay keeps the drain slow enough to be killed mid-way.
    broker = Broker(folder, "--ack-delay", "0.02").start()
    config = write_config(folder / "c.toml", broker.url, generate_secret_key(), drain=CRASHY)
    mid_drain = 0
    try:
        for k in range(kills):
            worker = start_run(db, config)
            time.sleep(rng.uniform(0.5, 1.5))
            if rng.random() < 0.25:  # now and then the broker dies too
                broker.kill()
                time.sleep(rng.uniform(0.0, 0.3))
                broker.start()
            worker.kill()
            _, err = worker.communicate(timeout=30)
            assert "Traceback" not in err, err
            assert integrity(db) == "ok", f"after kill {k + 1}"
            mid_drain += counts(db)["done"] < n
        assert mid_drain >= kills // 2, "most kills should land mid-drain, or the test proves little"
        drain_to_the_end(db, config, n)
    finally:
        broker.stop()
    return account(db, broker, n, kills=kills + broker.kills)


def test_a_short_crash_loop_loses_nothing(tmp_path: Path) -> None:
    report = crash_loop(tmp_path, kills=6, n=3000, seed=1)
    assert report["kills"] >= 6


@pytest.mark.skipif(
    not os.environ.get("TRIO_DRAIN_CRASH_LOOPS"),
    reason="the long crash loop runs in `nox -s crash` (set TRIO_DRAIN_CRASH_LOOPS)",
)
def test_the_long_crash_loop_loses_nothing(tmp_path: Path) -> None:
    kills = int(os.environ["TRIO_DRAIN_CRASH_LOOPS"])
    report = crash_loop(tmp_path, kills=kills, n=kills * 600, seed=int(time.time()))
    print("crash loop:", report)


# -- several drain processes on one outbox ---------------------------------------------------------


def test_drain_processes_sharing_one_outbox_never_send_a_row_twice(
    tmp_path: Path, outbox_target: str
) -> None:
    n = 3000
    fill(outbox_target, n)
    broker = Broker(tmp_path, "--ack-delay", "0.002").start()
    config = write_config(
        tmp_path / "c.toml", broker.url, generate_secret_key(), drain={"poll_interval": 0.2}
    )
    workers = [start_run(outbox_target, config) for _ in range(3 if "postgresql" in outbox_target else 2)]
    try:
        wait_for_done(outbox_target, n, 120, *workers)
    finally:
        errors = stop_all(*workers)
        broker.stop()
    assert all(w.returncode == 0 and "Traceback" not in e for w, e in zip(workers, errors, strict=True)), (
        errors
    )
    assert counts(outbox_target)["done"] == n
    sent = broker.sent()
    assert set(sent) == {f"r-{i}" for i in range(n)}
    assert max(sent.values()) == 1, "a row was transmitted twice while its lease held"


@pytest.mark.parametrize("value", ["nonsense", "claim_after_commit@zero", "send_left@0", "@3"])
def test_a_stray_crash_point_variable_does_not_stop_the_library_importing(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import trio_drain; print('imported')"],
        capture_output=True,
        text=True,
        env={**os.environ, ENV: value},
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr
    assert "ignoring" in result.stderr and "Traceback" not in result.stderr
