"""The SQLite back end: file handling, schema, migration, claims and fencing."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import attrs
import pytest

from trio_drain import (
    ConfigError,
    CorruptDatabase,
    InvalidTransition,
    Outbox,
    SchemaError,
    SendRequest,
    Status,
    StoreClosed,
    StoreError,
    UnknownRow,
    open_outbox,
)
from trio_drain import _lifecycle as lc
from trio_drain._outbox import parse_target
from trio_drain._store._base import RouteFilter

from .helpers import FakeClock

BIG = 10**12  # a max_age no test row reaches


def req(cid: str, **kw: object) -> SendRequest:
    fields: dict[str, object] = {"mesh": "alpha", "target_spec": "*", "payload": cid.encode(), "client_message_id": cid}
    fields.update(kw)
    return SendRequest(**fields)  # type: ignore[arg-type]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the file ------------------------------------------------------------------


async def test_new_file_is_created_0600_in_wal_mode_with_full_sync(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept(req("m-1"))
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{db_path}-wal").st_mode) == 0o600
        writer = ob.backend._writer  # type: ignore[attr-defined]
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_durability_normal_opts_down_to_synchronous_normal(db_path: Path) -> None:
    async with open_outbox(db_path, durability="normal") as ob:
        await ob.accept(req("m-1"))
        assert ob.backend._writer.execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]


async def test_unknown_durability_is_refused(db_path: Path) -> None:
    with pytest.raises(StoreError, match="durability"):
        async with open_outbox(db_path, durability="paranoid"):  # type: ignore[arg-type]
            pass


async def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite file at all" * 100)
    before = digest(db_path)
    with pytest.raises(CorruptDatabase):
        async with open_outbox(db_path):
            pass
    assert digest(db_path) == before
    assert not Path(f"{db_path}-wal").exists()


async def test_a_corrupted_database_fails_its_integrity_check_and_is_left_untouched(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept_many([req(f"m-{i}", payload=os.urandom(500)) for i in range(400)])
    # Checkpointed and closed; now scribble over a page in the middle.
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    data[10 * page: 10 * page + 200] = b"\xff" * 200
    db_path.write_bytes(bytes(data))
    before = digest(db_path)
    with pytest.raises(CorruptDatabase):
        async with open_outbox(db_path):
            pass
    assert digest(db_path) == before


async def test_missing_folder_and_directory_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        async with open_outbox(tmp_path / "nope" / "o.db"):
            pass
    with pytest.raises(StoreError, match="directory"):
        async with open_outbox(tmp_path):
            pass


def test_targets_parse_paths_and_urls() -> None:
    assert parse_target("o.db") == ("sqlite", "o.db")
    assert parse_target("sqlite:///rel/o.db") == ("sqlite", "rel/o.db")
    assert parse_target("sqlite:////abs/o.db") == ("sqlite", "/abs/o.db")
    assert parse_target("postgresql://u@h/db")[0] == "postgresql"
    for bad in ("mysql://x", "sqlite://o.db", ""):
        with pytest.raises(ConfigError):
            parse_target(bad)


async def test_using_a_closed_outbox_is_a_clear_error(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        pass
    with pytest.raises(StoreClosed):
        await ob.accept(req("m-1"))


# -- schema and migration ----------------------------------------------------------------

SEED_SCHEMA = """
CREATE TABLE outbox (
  id TEXT PRIMARY KEY, client_message_id TEXT NOT NULL UNIQUE, request_fingerprint BLOB NOT NULL,
  payload BLOB NOT NULL, enqueued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending','inflight','done','dead','aborted')),
  last_error TEXT, delivered_at INTEGER, broker_message_id TEXT, aborted_at INTEGER, aborted_by TEXT,
  superseded_by TEXT, mesh TEXT, target_spec TEXT, nonce TEXT, ciphertext TEXT, priority TEXT,
  sender_session_pubkey TEXT
);
CREATE TABLE members (id TEXT);
PRAGMA user_version = 7;
"""


def write_seed_db(path: Path, now: int) -> None:
    """An outbox.db as the seed's daemon leaves it: its table, no lease column,
    legacy rows with null routing, one row stuck inflight by a crash."""
    conn = sqlite3.connect(path)
    conn.executescript(SEED_SCHEMA)
    rows = [
        ("s1", "legacy-1", b"\x01" * 32, b"hello", now - 5000, 0, now - 5000, "pending", None, None, None, None, None, None, None, None, None, None, None, None),
        ("s2", "legacy-2", b"\x02" * 32, b"stuck", now - 4000, 1, now + 30000, "inflight", None, None, None, None, None, None, None, None, None, None, None, None),
        ("s3", "routed-3", b"\x03" * 32, b"r", now - 3000, 0, now - 3000, "pending", None, None, None, None, None, None, "alpha", "#t", "bm9uY2U=", "Y3Q=", "now", None),
        ("s4", "done-4", b"\x04" * 32, b"d", now - 2000, 1, now - 2000, "done", None, now - 1000, "b-4", None, None, None, "alpha", "*", None, None, "next", None),
    ]
    conn.executemany("INSERT INTO outbox VALUES (" + ",".join("?" * 20) + ")", rows)
    conn.commit()
    conn.close()


async def test_a_seed_database_migrates_in_place_and_keeps_every_row(db_path: Path, clock: FakeClock) -> None:
    write_seed_db(db_path, clock.now)
    async with open_outbox(db_path, clock=clock) as ob:
        counts = await ob.counts()
        assert counts == {"pending": 2, "inflight": 1, "done": 1, "dead": 0, "aborted": 0}
        legacy = await ob.get("s1")
        assert legacy is not None and legacy.mesh is None and legacy.lease_expires_at is None
        # The row the seed left inflight forever has no lease: it is recovered at once.
        assert await ob.recover_expired_leases(max_attempts=25) == 1
        stuck = await ob.get("s2")
        assert stuck is not None and stuck.status is Status.PENDING
        rows = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="t")
        assert [r.id for r in rows] == ["s3", "s1", "s2"]  # 'now' first, then by enqueue time
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT version FROM trio_drain_schema").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 7  # the daemon's own, untouched
    assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == 0
    conn.close()


async def test_reopening_a_migrated_database_is_a_no_op(db_path: Path, clock: FakeClock) -> None:
    write_seed_db(db_path, clock.now)
    async with open_outbox(db_path, clock=clock):
        pass
    async with open_outbox(db_path, clock=clock) as ob:
        assert sum((await ob.counts()).values()) == 4


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    async with open_outbox(db_path):
        pass
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE trio_drain_schema SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="upgrade"):
        async with open_outbox(db_path):
            pass


# -- claims ------------------------------------------------------------------


async def test_claims_take_priority_then_enqueue_order(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    for cid, prio in [("a", "low"), ("b", "next"), ("c", "now"), ("d", "next"), ("e", "now")]:
        await ob.accept(req(cid, priority=prio))
        clock.advance(1)
    rows = await ob.claim(limit=3, lease_ms=1000, max_age_ms=BIG, token="t")
    assert [r.client_message_id for r in rows] == ["c", "e", "b"]
    assert all(r.status is Status.INFLIGHT and r.attempts == 1 and r.lease_token == "t" for r in rows)
    assert all(r.lease_expires_at == clock.now + 1000 for r in rows)
    rest = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="u")
    assert [r.client_message_id for r in rest] == ["d", "a"]


async def test_claims_skip_rows_not_yet_due_and_rows_past_max_age(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await ob.accept(req("old"))
    clock.advance(10_000)
    await ob.accept(req("young"))
    (young,) = await ob.claim(limit=10, lease_ms=1000, max_age_ms=5_000, token="t")
    assert young.client_message_id == "young"
    await ob.complete([lc.on_error(young, error="x", permanent=False, now=clock.now,
                                   policy=lc.RetryPolicy(), jitter=0.0)])
    assert await ob.claim(limit=10, lease_ms=1000, max_age_ms=5_000, token="u") == []
    assert await ob.next_due_at(max_age_ms=5_000) == clock.now + 250
    assert await ob.expire_stale(max_age_ms=5_000) == 1
    old = await ob.get_by_client_id("old")
    assert old is not None and (old.status, old.last_error) == (Status.DEAD, "expired")


async def test_claims_leave_blocked_routes_alone(clocked_outbox: Outbox) -> None:
    ob = clocked_outbox
    key = "ab" * 32
    await ob.accept_many([
        req("sess", sender_session_pubkey=key), req("mesh-a"), req("mesh-b", mesh="beta"),
        req("no-mesh", mesh=None),
    ])
    blocked = RouteFilter(sessions=frozenset({key}), meshes=frozenset({"alpha"}), null_mesh=True)
    rows = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="t", exclude=blocked)
    assert [r.client_message_id for r in rows] == ["mesh-b"]
    # A session row whose mesh is blocked still goes: sessions have their own socket.
    rows = await ob.claim(limit=10, lease_ms=1000, max_age_ms=BIG, token="t",
                          exclude=RouteFilter(meshes=frozenset({"alpha"})))
    assert sorted(r.client_message_id for r in rows) == ["no-mesh", "sess"]


async def test_the_claim_query_uses_the_claim_index(clocked_outbox: Outbox) -> None:
    conn: sqlite3.Connection = clocked_outbox.backend._reader  # type: ignore[attr-defined]
    plan = " ".join(str(r) for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM outbox INDEXED BY outbox_claim WHERE status = 'pending'"
        " AND next_attempt_at <= 1 AND enqueued_at >= 0 ORDER BY priority_rank, enqueued_at LIMIT 5"))
    assert "outbox_claim" in plan and "TEMP B-TREE" not in plan


# -- fencing -------------------------------------------------------------------------


async def test_a_stale_lease_changes_nothing(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await ob.accept(req("m-1"))
    (first,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t1")
    clock.advance(1000)
    assert await ob.recover_expired_leases(max_attempts=25) == 1
    (second,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t2")
    assert second.attempts == 2
    # The first worker's late ack applies to nothing.
    assert await ob.complete([lc.on_ack(first, broker_message_id="late", now=clock.now)]) == [False]
    row = await ob.get(first.id)
    assert row is not None and (row.status, row.lease_token) == (Status.INFLIGHT, "t2")
    assert await ob.complete([lc.on_ack(second, broker_message_id="b", now=clock.now)]) == [True]
    assert await ob.complete([lc.on_ack(second, broker_message_id="again", now=clock.now)]) == [False]
    row = await ob.get(first.id)
    assert row is not None and (row.status, row.broker_message_id, row.lease_token) == (Status.DONE, "b", None)


async def test_leases_not_yet_expired_are_not_recovered(clocked_outbox: Outbox, clock: FakeClock) -> None:
    await clocked_outbox.accept(req("m-1"))
    await clocked_outbox.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    clock.advance(999)
    assert await clocked_outbox.recover_expired_leases(max_attempts=25) == 0


# -- inspection and operator actions ----------------------------------------------------


async def test_list_is_newest_first_filtered_and_pageable(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    for i in range(5):
        await ob.accept(req(f"m-{i}"))
        clock.advance(10)
    rows = await ob.list(limit=3)
    assert [r.client_message_id for r in rows] == ["m-4", "m-3", "m-2"]
    older = await ob.list(limit=3, before=rows[-1].enqueued_at)
    assert [r.client_message_id for r in older] == ["m-1", "m-0"]
    assert await ob.list("done") == []
    assert len(await ob.list(Status.PENDING)) == 5


async def test_counts_always_have_all_five_statuses(outbox: Outbox) -> None:
    assert await outbox.counts() == {"pending": 0, "inflight": 0, "done": 0, "dead": 0, "aborted": 0}


async def test_requeue_aborts_the_row_and_enqueues_a_fresh_copy(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    outcome = await ob.accept(req("m-1", meta={"k": 1}))
    (row,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    await ob.complete([lc.on_error(row, error="forbidden", permanent=True, now=clock.now, policy=lc.RetryPolicy(), jitter=0)])
    clock.advance(5)
    successor = await ob.requeue(row.id)
    old = await ob.get(row.id)
    assert old is not None
    assert (old.status, old.aborted_by, old.superseded_by, old.aborted_at) == (Status.ABORTED, "operator", successor.id, clock.now)
    assert successor.client_message_id != "m-1"
    assert (successor.status, successor.attempts, successor.payload, successor.request_fingerprint) == (
        Status.PENDING, 0, old.payload, old.request_fingerprint)
    assert (successor.mesh, successor.target_spec, successor.priority) == (old.mesh, old.target_spec, old.priority)
    assert await ob.get(successor.id) == successor
    assert outcome.row_id == row.id


async def test_requeue_of_an_inflight_row_fences_the_old_lease(clocked_outbox: Outbox, clock: FakeClock) -> None:
    await clocked_outbox.accept(req("m-1"))
    (row,) = await clocked_outbox.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    await clocked_outbox.requeue(row.id)
    assert await clocked_outbox.complete([lc.on_ack(row, broker_message_id="b", now=clock.now)]) == [False]


async def test_operator_actions_refuse_unknown_rows_and_wrong_states(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    with pytest.raises(UnknownRow):
        await ob.requeue("nope")
    with pytest.raises(UnknownRow):
        await ob.drop("nope")
    await ob.accept(req("m-1"))
    (row,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=BIG, token="t")
    with pytest.raises(InvalidTransition):
        await ob.drop(row.id)  # inflight: the worker owns it
    await ob.complete([lc.on_ack(row, broker_message_id="b", now=clock.now)])
    with pytest.raises(InvalidTransition):
        await ob.requeue(row.id)
    with pytest.raises(InvalidTransition):
        await ob.drop(row.id)
    after = await ob.get(row.id)
    assert after is not None and after.status is Status.DONE


async def test_prune_deletes_only_old_done_rows(clocked_outbox: Outbox, clock: FakeClock) -> None:
    ob = clocked_outbox
    await ob.accept_many([req(f"m-{i}") for i in range(4)])
    rows = await ob.claim(limit=4, lease_ms=1000, max_age_ms=BIG, token="t")
    policy = lc.RetryPolicy()
    await ob.complete([
        lc.on_ack(rows[0], broker_message_id="b0", now=clock.now),
        lc.on_error(rows[1], error="forbidden", permanent=True, now=clock.now, policy=policy, jitter=0),
        lc.on_ack(rows[2], broker_message_id="b2", now=clock.now + 10_000),
    ])
    await ob.drop(rows[1].id)
    clock.advance(5_000)
    assert await ob.prune(older_than=1.0) == 1  # rows[0] only; rows[2] is too young
    assert await ob.get(rows[0].id) is None
    assert (await ob.counts()) == {"pending": 0, "inflight": 1, "done": 1, "dead": 0, "aborted": 1}


async def test_stored_rows_round_trip_every_column(clocked_outbox: Outbox) -> None:
    request = req("m-1", priority="low", nonce="bm9uY2U=", ciphertext="Y3Q=", reply_to_id="r-0",
                  sender_session_pubkey="cd" * 32, target_spec="ef" * 32)
    await clocked_outbox.accept(request)
    row = await clocked_outbox.get_by_client_id("m-1")
    assert row is not None
    assert attrs.asdict(row, filter=lambda a, v: a.name in ("nonce", "ciphertext", "priority", "sender_session_pubkey", "target_spec")) == {
        "nonce": "bm9uY2U=", "ciphertext": "Y3Q=", "priority": "low",
        "sender_session_pubkey": "cd" * 32, "target_spec": "ef" * 32}
