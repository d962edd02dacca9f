"""What ``trio-drain run`` says at the default log level (SPEC section 8): a
line at start, one when a route goes down or comes back, a progress line
every interval while rows move (none while idle), and a summary at stop."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from trio_drain import generate_secret_key
from trio_drain._cli._progress import duration

from .procs import CLI, Broker, counts, fill, write_config


def wait_for_line(log: Path, pattern: str, seconds: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no line like {pattern!r} within {seconds}s:\n{log.read_text()}")


def test_run_says_what_it_does_at_the_default_log_level(tmp_path: Path) -> None:
    broker = Broker(tmp_path, "--ack-delay", "0.01").start()
    db = tmp_path / "o.db"
    fill(db, 400)
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain={"max_inflight": 4})
    log = tmp_path / "run.log"
    with log.open("a") as stderr:
        proc = subprocess.Popen(
            [*CLI, "run", "--db", str(db), "--config", str(config), "--progress-interval", "0.3"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        wait_for_line(log, r"draining sqlite:\S+ through 1 mesh broker\(s\), up to 4 sends in flight")
        progress = wait_for_line(
            log,
            r"progress: ([\d,.]+) delivered/s over [\d ]+ms \(([\d,]+) delivered\); backlog ([\d,]+);"
            r" oldest pending (\S+)",
        )
        assert float(progress.group(1).replace(",", "")) > 0
        assert int(progress.group(2).replace(",", "")) > 0
        deadline = time.monotonic() + 60
        while counts(db)["done"] < 400 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counts(db)["done"] == 400
        # Idle: no progress line while nothing moves.
        time.sleep(1.0)
        lines = log.read_text().count("progress:")
        time.sleep(1.5)
        assert log.read_text().count("progress:") == lines, log.read_text()

        broker.kill()
        wait_for_line(
            log, r"mesh alpha: its broker at ws://127\.0\.0\.1:\d+/ws is down.*reconnecting with backoff"
        )
        broker.start()
        # The outage is shown in the unit that reads best: "down 501 ms", "down 3 s".
        wait_for_line(log, r"mesh alpha: its broker at ws://127\.0\.0\.1:\d+/ws is back \(down \d+ m?s\)")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        broker.stop()
    assert proc.returncode == 0, log.read_text()
    summary = wait_for_line(
        log, r"stopped after [^:]+: 400 delivered \(([\d,.]+)/s\), 0 of them duplicates,.*"
    )
    assert "outbox now 0 pending, 0 inflight, 400 done, 0 dead, 0 aborted" in summary.group(0)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.25, "250 ms"),
        (42.9, "42 s"),
        (252, "4 min 12 s"),
        (3 * 3600 + 300, "3 h 5 min"),
        (2 * 86400 + 4 * 3600, "2 d 4 h"),
    ],
)
def test_durations_read_as_a_person_says_them(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown
