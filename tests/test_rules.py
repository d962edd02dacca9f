"""The state machine's bulk rules, as the stores' SQL runs them, give the
same answer as `_lifecycle.holds` on any row, on SQLite and PostgreSQL.

Rows are drawn close to `now` and to the rules' edges (due exactly now,
enqueued exactly max_age ago, a lease ending now, attempts at the cap), so
an off-by-one or a NULL handled differently in SQL fails here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import attrs
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_drain import Status
from trio_drain import _lifecycle as lc
from trio_drain._store._sql import Dialect

from .pg import PostgresServer

POLICY = lc.RetryPolicy(max_attempts=3, max_age_ms=5)
NOW = 1_000
RULES = {
    "claimable": lc.CLAIMABLE,
    "waiting": lc.WAITING,
    "past_max_age": lc.PAST_MAX_AGE,
    "lease_ran_out": lc.LEASE_RAN_OUT,
    "at_attempt_cap": lc.AT_ATTEMPT_CAP,
}
COLUMNS = ("id", "status", "attempts", "next_attempt_at", "enqueued_at", "lease_expires_at")


@attrs.frozen
class Facts:
    """The columns the rules read."""

    id: str
    status: Status
    attempts: int
    next_attempt_at: int
    enqueued_at: int
    lease_expires_at: int | None


near = st.integers(NOW - 8, NOW + 3)
rows = st.lists(
    st.builds(
        Facts,
        id=st.just(""),
        status=st.sampled_from(Status),
        attempts=st.integers(0, 5),
        next_attempt_at=near,
        enqueued_at=near,
        lease_expires_at=st.none() | near,
    ),
    max_size=30,
).map(lambda found: [attrs.evolve(r, id=f"r{i}") for i, r in enumerate(found)])

#: Both dialects bind now as a parameter here, so one `now` decides for
#: both; PostgreSQL's server clock is the store machine's business.
SQLITE = Dialect(mark="?")
POSTGRES = Dialect(mark="%s")


def insert_sql(mark: str) -> str:
    names = ", ".join(COLUMNS)
    marks = ", ".join([mark] * len(COLUMNS))
    return (
        f"INSERT INTO outbox (client_message_id, request_fingerprint, payload, {names})"
        f" VALUES ({mark}, {mark}, {mark}, {marks})"
    )


def values(row: Facts) -> tuple[Any, ...]:
    return (
        row.id,
        b"f",
        b"p",
        row.id,
        row.status.value,
        row.attempts,
        row.next_attempt_at,
        row.enqueued_at,
        row.lease_expires_at,
    )


def selected(conn: Any, dialect: Dialect, rule: lc.Rule) -> set[str]:
    where, args = dialect.where(rule, now=NOW, max_age_ms=POLICY.max_age_ms, max_attempts=POLICY.max_attempts)
    return {r[0] for r in conn.execute(f"SELECT id FROM outbox WHERE {where}", args).fetchall()}


def expected(found: list[Facts], rule: lc.Rule) -> set[str]:
    return {r.id for r in found if lc.holds(rule, r, now=NOW, policy=POLICY)}


@pytest.fixture(scope="module")
def sqlite_outbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    """The real schema (made by the store), then a plain connection to it."""
    import trio

    from trio_drain import open_outbox

    path = tmp_path_factory.mktemp("rules") / "outbox.db"

    async def make() -> None:
        async with open_outbox(str(path), durability="normal"):
            pass

    trio.run(make)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def postgres_outbox(pg_server: PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    import trio

    from trio_drain import open_outbox

    url = pg_server.create_database()

    async def make() -> None:
        async with open_outbox(url):
            pass

    trio.run(make)
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(found=rows)
def test_sqlite_sql_agrees_with_the_state_machine(
    sqlite_outbox: sqlite3.Connection, found: list[Facts]
) -> None:
    conn = sqlite_outbox
    conn.execute("BEGIN")
    try:
        conn.executemany(insert_sql("?"), [values(r) for r in found])
        for name, rule in RULES.items():
            assert selected(conn, SQLITE, rule) == expected(found, rule), name
    finally:
        conn.execute("ROLLBACK")


@SETTINGS
@given(found=rows)
def test_postgres_sql_agrees_with_the_state_machine(
    postgres_outbox: psycopg.Connection[Any], found: list[Facts]
) -> None:
    conn = postgres_outbox
    with pytest.raises(_Rollback), conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(insert_sql("%s"), [values(r) for r in found])
        for name, rule in RULES.items():
            assert selected(conn, POSTGRES, rule) == expected(found, rule), name
        raise _Rollback


class _Rollback(Exception):
    """Leaves the example's transaction without committing it."""


def test_the_rules_see_what_the_spec_says() -> None:
    """A few rows spelled out, so the property above cannot pass on rules that are wrong in both places."""
    due = Facts("a", Status.PENDING, 0, NOW, NOW - POLICY.max_age_ms, None)
    assert lc.holds(lc.CLAIMABLE, due, now=NOW, policy=POLICY)
    assert not lc.holds(lc.CLAIMABLE, attrs.evolve(due, next_attempt_at=NOW + 1), now=NOW, policy=POLICY)
    old = attrs.evolve(due, enqueued_at=NOW - POLICY.max_age_ms - 1)
    assert not lc.holds(lc.CLAIMABLE, old, now=NOW, policy=POLICY)
    assert lc.holds(lc.PAST_MAX_AGE, old, now=NOW, policy=POLICY)
    held = Facts("b", Status.INFLIGHT, 3, NOW, NOW, NOW)
    assert lc.holds(lc.LEASE_RAN_OUT, held, now=NOW, policy=POLICY)
    assert not lc.holds(
        lc.LEASE_RAN_OUT, attrs.evolve(held, lease_expires_at=NOW + 1), now=NOW, policy=POLICY
    )
    assert lc.holds(lc.LEASE_RAN_OUT, attrs.evolve(held, lease_expires_at=None), now=NOW, policy=POLICY)
    assert lc.holds(lc.AT_ATTEMPT_CAP, held, now=NOW, policy=POLICY)
    assert not lc.holds(lc.AT_ATTEMPT_CAP, attrs.evolve(held, attempts=2), now=NOW, policy=POLICY)
