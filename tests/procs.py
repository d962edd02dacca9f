"""Running the command line as subprocesses: brokers, drain processes, queries."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

CLI = [sys.executable, "-m", "trio_drain"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess[str], status: int, fragment: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def write_config(
    path: Path, url: str, secret: str, extra: str = "", drain: Mapping[str, float] | None = None
) -> Path:
    """A `trio-drain run` config for one mesh; `drain` sets [drain] fields."""
    settings = {"max_inflight": 16, "poll_interval": 0.05, **(drain or {})}
    lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
    path.write_text(
        f'{extra}[drain]\n{lines}\n[[mesh]]\nslug = "alpha"\nmesh_id = "mesh-alpha"\n'
        f'member_id = "member-1"\nbroker_url = "{url}"\nsecret_key = "{secret}"\n'
    )
    return path


def start_broker(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*CLI, "broker", "serve", "--open", "--port", "0", "--db", str(tmp_path / "broker.db"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, proc.stderr.read() if proc.stderr else ""
    return proc, line.split()[-1]


def counts(db: Path | str) -> dict[str, int]:
    return json.loads(run("outbox", "stats", "--db", str(db), "--json").stdout)  # type: ignore[no-any-return]


def start_run(db: Path | str, config: Path, *flags: str) -> subprocess.Popen[str]:
    """`trio-drain [flags] run` as a background process."""
    return subprocess.Popen([*CLI, *flags, "run", "--db", str(db), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_done(db: Path | str, n: int, seconds: float, *procs: subprocess.Popen[str]) -> None:
    """Poll the outbox until n rows are done, `seconds` pass, or every one of
    `procs` (if given) has exited."""
    deadline = time.monotonic() + seconds
    while counts(db)["done"] < n and time.monotonic() < deadline:
        if procs and all(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)
