"""The state machine's bulk rules, as the stores' SQL runs them, give the
same answer as `_lifecycle.holds` on any row, on SQLite and PostgreSQL.

Rows are drawn close to `now` and to the rules' edges (due exactly now,
enqueued exactly max_age ago, a lease ending now, attempts at the cap), in
a few ordering lanes and routes, some of them paused, so an off-by-one, a
NULL handled differently in SQL or a route named differently fails here.

A lane's rule is judged in SQL from the flag the stores keep
(`lane_blocked`); here the flag is written as the lane's definition says,
so this checks the rendering. That the stores keep the flag true under
every transition is the store state machine's business
(tests/test_store_machine.py).
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
    "lane_hold_ran_out": lc.LANE_HOLD_RAN_OUT,
    "at_attempt_cap": lc.AT_ATTEMPT_CAP,
}
COLUMNS = (
    "id",
    "status",
    "attempts",
    "next_attempt_at",
    "enqueued_at",
    "lease_expires_at",
    "ordering_key",
    "mesh",
    "sender_session_pubkey",
    "lane_blocked",
)
SESSION = "ab" * 32
ROUTES = ["mesh:alpha", "mesh:beta", f"session:{SESSION}"]


@attrs.frozen
class Facts:
    """The columns the rules read."""

    id: str
    status: Status
    attempts: int
    next_attempt_at: int
    enqueued_at: int
    lease_expires_at: int | None
    ordering_key: str | None
    mesh: str | None
    sender_session_pubkey: str | None


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
        ordering_key=st.sampled_from([None, "k1", "k2"]),
        mesh=st.sampled_from([None, "alpha", "beta"]),
        sender_session_pubkey=st.sampled_from([None, SESSION]),
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


def values(row: Facts, world: lc.Table) -> tuple[Any, ...]:
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
        row.ordering_key,
        row.mesh,
        row.sender_session_pubkey,
        0 if world.first_in_lane(row) else 1,  # as the stores keep it
    )


def selected(conn: Any, dialect: Dialect, rule: lc.Rule) -> set[str]:
    where, args = dialect.where(rule, now=NOW, max_age_ms=POLICY.max_age_ms, max_attempts=POLICY.max_attempts)
    return {r[0] for r in conn.execute(f"SELECT id FROM outbox WHERE {where}", args).fetchall()}


def expected(world: lc.Table, rule: lc.Rule) -> set[str]:
    return {r.id for r in world.rows if lc.holds(rule, r, now=NOW, policy=POLICY, world=world)}


def fill(conn: Any, mark: str, found: list[Facts], paused: frozenset[str]) -> lc.Table:
    world = lc.Table(found, paused=paused)
    conn.cursor().executemany(insert_sql(mark), [values(r, world) for r in found])
    conn.cursor().executemany(
        f"INSERT INTO trio_drain_paused (route, paused_at, paused_by) VALUES ({mark}, 0, 'test')",
        [(route,) for route in sorted(paused)],
    )
    return world


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


paused_routes = st.frozensets(st.sampled_from(ROUTES))


@SETTINGS
@given(found=rows, paused=paused_routes)
def test_sqlite_sql_agrees_with_the_state_machine(
    sqlite_outbox: sqlite3.Connection, found: list[Facts], paused: frozenset[str]
) -> None:
    conn = sqlite_outbox
    conn.execute("BEGIN")
    try:
        world = fill(conn, "?", found, paused)
        for name, rule in RULES.items():
            assert selected(conn, SQLITE, rule) == expected(world, rule), name
    finally:
        conn.execute("ROLLBACK")


@SETTINGS
@given(found=rows, paused=paused_routes)
def test_postgres_sql_agrees_with_the_state_machine(
    postgres_outbox: psycopg.Connection[Any], found: list[Facts], paused: frozenset[str]
) -> None:
    conn = postgres_outbox
    with pytest.raises(_Rollback), conn.transaction():
        world = fill(conn, "%s", found, paused)
        for name, rule in RULES.items():
            assert selected(conn, POSTGRES, rule) == expected(world, rule), name
        raise _Rollback


class _Rollback(Exception):
    """Leaves the example's transaction without committing it."""


def test_the_rules_see_what_the_spec_says() -> None:
    """A few rows spelled out, so the property above cannot pass on rules that are wrong in both places."""
    due = Facts("a", Status.PENDING, 0, NOW, NOW - POLICY.max_age_ms, None, None, "alpha", None)
    world = lc.Table([due])
    assert lc.holds(lc.CLAIMABLE, due, now=NOW, policy=POLICY, world=world)
    later = attrs.evolve(due, next_attempt_at=NOW + 1)
    assert not lc.holds(lc.CLAIMABLE, later, now=NOW, policy=POLICY, world=world)
    old = attrs.evolve(due, enqueued_at=NOW - POLICY.max_age_ms - 1)
    assert not lc.holds(lc.CLAIMABLE, old, now=NOW, policy=POLICY, world=world)
    paused = lc.Table([due], paused=frozenset({"mesh:alpha"}))
    assert not lc.holds(lc.CLAIMABLE, due, now=NOW, policy=POLICY, world=paused)
    assert lc.holds(lc.PAST_MAX_AGE, old, now=NOW, policy=POLICY)
    held = Facts("b", Status.INFLIGHT, 3, NOW, NOW, NOW, None, "alpha", None)
    assert lc.holds(lc.LEASE_RAN_OUT, held, now=NOW, policy=POLICY)
    assert not lc.holds(
        lc.LEASE_RAN_OUT, attrs.evolve(held, lease_expires_at=NOW + 1), now=NOW, policy=POLICY
    )
    assert lc.holds(lc.LEASE_RAN_OUT, attrs.evolve(held, lease_expires_at=None), now=NOW, policy=POLICY)
    assert lc.holds(lc.AT_ATTEMPT_CAP, held, now=NOW, policy=POLICY)
    assert not lc.holds(lc.AT_ATTEMPT_CAP, attrs.evolve(held, attempts=2), now=NOW, policy=POLICY)
