from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from trio_drain import Outbox, open_outbox

from .helpers import FakeClock
from .pg import PostgresServer, find_binaries, open_clocked_outbox

#: Every back end the store tests run against.
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole run (initdb + pg_ctl, loopback)."""
    bindir = find_binaries()
    if bindir is None:
        message = "PostgreSQL is not installed (no initdb); .ci/run installs the postgresql package"
        if os.environ.get("TRIO_DRAIN_REQUIRE_POSTGRES"):  # CI: skipping would hide the back end
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the test server."""
    return pg_server.create_database()


@pytest.fixture(params=BACKENDS)
def outbox_target(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Where a test's outbox lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(db_path)
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def outbox(outbox_target: str) -> AsyncIterator[Outbox]:
    """A real outbox (each back end in turn), at the default durability."""
    async with open_outbox(outbox_target) as ob:
        yield ob


@pytest.fixture
async def clocked_outbox(outbox_target: str, clock: FakeClock) -> AsyncIterator[Outbox]:
    """A real outbox (each back end in turn) whose clock only moves when the test
    says; on PostgreSQL, which judges times by the server's clock, the fake
    clock stands in for the server's too."""
    async with open_clocked_outbox(outbox_target, clock) as ob:
        yield ob
