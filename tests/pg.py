"""A throwaway PostgreSQL server for tests and the benchmark.

`initdb` into a fresh temp folder, `pg_ctl start` on a free loopback port,
trust authentication, no Unix socket. `initdb` refuses to run as root, so
when the tests run as root the server runs as the `postgres` system user
(through `runuser`), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg

from trio_drain import Outbox, open_outbox
from trio_drain._store._postgres._backend import PostgresBackend


def find_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None if PostgreSQL is absent."""
    found = shutil.which("initdb")
    if found is not None and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One server in a temp folder. `start()`, `create_database()`, `stop()`."""

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="trio-drain-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, user="postgres", group="postgres")

    @property
    def dsn(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=''"
            f" -c max_connections=200 -c fsync={'on' if self.fsync else 'off'}"
            " -c full_page_writes=off -c shared_buffers=128MB"
        )
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data), check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def fake_server_clock(outbox: Outbox, clock: Callable[[], int]) -> None:
    """Let `clock` stand in for the PostgreSQL server's clock too (no-op on
    SQLite). PostgreSQL judges leases, due times and max_age by its own
    clock, which a test's fake clock cannot move."""
    if isinstance(outbox.backend, PostgresBackend):
        outbox.backend.server_clock = clock


@asynccontextmanager
async def open_clocked_outbox(target: str, clock: Callable[[], int]) -> AsyncIterator[Outbox]:
    """An outbox (either back end) whose times all follow `clock`, the
    database's included: for tests of the state machine's timing."""
    async with open_outbox(target, clock=clock, durability="normal") as ob:
        fake_server_clock(ob, clock)
        yield ob
