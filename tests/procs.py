"""Running the command line as subprocesses: brokers, drain processes, queries."""

from __future__ import annotations

import collections
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from trio_drain import open_outbox

from .builders import req
from .pg import free_port

CLI = [sys.executable, "-m", "trio_drain"]

#: [drain] settings under which rows a killed process held come back within seconds.
SHORT_LEASES = {"poll_interval": 0.2, "lease": 3.0, "ack_timeout": 2.0, "maintenance_interval": 0.5}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess[str], status: int, fragment: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def write_config(
    path: Path,
    url: str,
    secret: str,
    extra: str = "",
    drain: Mapping[str, float] | None = None,
    *,
    slug: str = "alpha",
) -> Path:
    """A `trio-drain run` config for one mesh; `drain` sets [drain] fields."""
    settings = {"max_inflight": 16, "poll_interval": 0.05, **(drain or {})}
    lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
    path.write_text(
        f'{extra}[drain]\n{lines}\n[[mesh]]\nslug = "{slug}"\nmesh_id = "mesh-{slug}"\n'
        f'member_id = "member-1"\nbroker_url = "{url}"\nsecret_key = "{secret}"\n'
    )
    return path


def start_broker(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*CLI, "broker", "serve", "--open", "--port", "0", "--db", str(tmp_path / "broker.db"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, proc.stderr.read() if proc.stderr else ""
    return proc, line.split()[-1]


def query(db: Path | str, sql: str) -> list[Any]:
    """`sql`'s rows, read from a SQLite file on a connection of their own."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def statuses(db: Path | str, detail: str) -> dict[str, tuple[str, str | None]]:
    """Each row's status and its `detail` column, by client_message_id,
    read from the SQLite file."""
    sql = f"SELECT client_message_id, status, {detail} FROM outbox"
    return {cid: (status, value) for cid, status, value in query(db, sql)}


def counts(db: Path | str) -> dict[str, int]:
    return json.loads(run("outbox", "stats", "--db", str(db), "--json").stdout)  # type: ignore[no-any-return]


def start_run(db: Path | str, config: Path, *flags: str, log: Path | None = None) -> subprocess.Popen[str]:
    """`trio-drain [flags] run` as a background process. Its stderr is a
    pipe read at `stop_all`, or, for a run that logs much (faults), the file
    `log`: a pipe nobody reads blocks the process once it fills."""
    if log is None:
        return subprocess.Popen(
            [*CLI, *flags, "run", "--db", str(db), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    with log.open("a") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*CLI, *flags, "run", "--db", str(db), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def wait_for_done(db: Path | str, n: int, seconds: float, *procs: subprocess.Popen[str]) -> None:
    """Poll the outbox until n rows are done, `seconds` pass, or every one of
    `procs` (if given) has exited."""
    deadline = time.monotonic() + seconds
    while counts(db)["done"] < n and time.monotonic() < deadline:
        if procs and all(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)


def stop_all(*procs: subprocess.Popen[str]) -> list[str]:
    """SIGTERM whichever of `procs` still run; wait for all; their stderr."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [proc.communicate(timeout=30)[1] or "" for proc in procs]


def fill(target: str | Path, n: int) -> None:
    async def go() -> None:
        async with open_outbox(target) as ob:
            await ob.accept_many([req(f"r-{i}", payload=b"r%d" % i) for i in range(n)])

    trio.run(go)


class Broker:
    """A reference broker process on a fixed port, killable and restartable."""

    def __init__(self, folder: Path, *extra: str) -> None:
        self.port = free_port()
        self.ledger = folder / "broker.db"
        self.receipts = folder / "receipts"
        self.log = folder / "broker.log"
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> Broker:
        with self.log.open("a") as stderr:  # the child keeps its own descriptor
            self.proc = self._spawn(stderr)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, self.log.read_text()
        return self

    def _spawn(self, stderr: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                *CLI,
                "broker",
                "serve",
                "--open",
                "--port",
                str(self.port),
                "--db",
                str(self.ledger),
                "--receipts",
                str(self.receipts),
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            # A file, not a pipe: a broker injecting faults logs more than a
            # pipe nobody reads holds.
            stderr=stderr,
            text=True,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=30)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=30)

    def sent(self) -> collections.Counter[str]:
        return collections.Counter(line.split("\t")[1] for line in self.receipts.read_text().splitlines())

    def accepted(self) -> dict[str, str]:
        """The broker's message id for each client_message_id it accepted."""
        rows = query(self.ledger, "SELECT client_message_id, message_id FROM accepted")
        assert len(rows) == len({cid for cid, _ in rows})
        return dict(rows)

    def copies(self) -> dict[str, int]:
        """How many times each client_message_id was delivered (more than
        once only where the broker does not dedupe)."""
        return dict(query(self.ledger, "SELECT client_message_id, copies FROM accepted"))
