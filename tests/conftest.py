from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from trio_drain import Outbox, open_outbox

from .helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
async def outbox(db_path: Path) -> AsyncIterator[Outbox]:
    """A real SQLite outbox in a temp folder, at the default durability."""
    async with open_outbox(db_path) as ob:
        yield ob


@pytest.fixture
async def clocked_outbox(db_path: Path, clock: FakeClock) -> AsyncIterator[Outbox]:
    """A real SQLite outbox whose wall clock only moves when the test says."""
    async with open_outbox(db_path, clock=clock, durability="normal") as ob:
        yield ob
