"""Big batches on PostgreSQL: `accept_many` of `stream_from` rows or more is
copied into the table (binary COPY) as its requests are validated, chunk by
chunk, and answers exactly as the insert does.

Each test runs the batch through the COPY and, where it compares, the same
batch through the insert (`stream_from` raised past it) on a database of its
own: the outcomes, the rows, the lanes and the wakeups must not tell the two
apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_drain import (
    AcceptOutcome,
    InvalidRequest,
    Outbox,
    OutcomeKind,
    Priority,
    SendRequest,
    Status,
    open_outbox,
)
from trio_drain import _lifecycle as lc
from trio_drain._store._postgres import _copy, _pipelines
from trio_drain._store._postgres._backend import PostgresBackend
from trio_drain._store._postgres._wire import Wire

from .builders import BIG, req
from .helpers import wait_until
from .pg import PostgresServer

#: Rows in a test's big batch: several chunks (`FIRST_CHUNK`, `NEXT_CHUNK`).
N = 700


def backend_of(outbox: Outbox) -> PostgresBackend:
    assert isinstance(outbox.backend, PostgresBackend)
    return outbox.backend


@asynccontextmanager
async def by_insert(url: str) -> AsyncIterator[Outbox]:
    """An outbox that writes every batch by the insert, as before COPY."""
    async with open_outbox(url) as ob:
        backend_of(ob).stream_from = 10**9
        yield ob


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """COPYs started, counted (a batch that fell back to the insert counts too)."""
    started: list[int] = []
    copy_in = Wire.copy_in

    def counted(self: Wire, sql: bytes) -> None:
        started.append(1)
        copy_in(self, sql)

    monkeypatch.setattr(Wire, "copy_in", counted)
    return started


def varied(prefix: str, n: int = N) -> list[SendRequest]:
    """Requests whose optional fields change from row to row (so that no
    column of a chunk is the same throughout), and runs where they do not."""
    out = []
    for i in range(n):
        fields: dict[str, Any] = {"payload": f"body {i} ✓".encode() * (i % 3)}
        if i % 4 == 1:
            fields["priority"] = "now"
        if i % 5 == 2:
            fields["mesh"] = "beta"
        if i % 7 == 3:
            fields.update(nonce="bm9uY2U=", ciphertext="Y2lwaGVy", target_spec="@peer")
        if i % 11 == 4:
            fields["target_spec"] = "#chän"
        if i >= n - 100:  # the last chunk: every optional field the same
            fields = {"payload": b"same"}
        out.append(req(f"{prefix}-{i}", **fields))
    return out


def stored(row: Any) -> dict[str, Any]:
    """What a row holds but its id and times."""
    different = {"id", "enqueued_at", "next_attempt_at"}
    return {k: v for k, v in row.to_dict().items() if k not in different}


def answer(o: AcceptOutcome) -> tuple[Any, ...]:
    return (o.kind, o.code, o.reason, o.inserted)


async def test_a_big_batch_is_copied_and_its_rows_are_the_rows_the_insert_writes(
    pg_server: PostgresServer, copies: list[int]
) -> None:
    requests = varied("m")
    a, b = pg_server.create_database(), pg_server.create_database()
    async with open_outbox(a) as copied, by_insert(b) as inserted:
        mine = await copied.accept_many(requests)
        assert len(copies) == 1
        theirs = await inserted.accept_many(requests)
        assert len(copies) == 1
        assert [answer(o) for o in mine] == [answer(o) for o in theirs] == [answer(theirs[0])] * N
        assert all(o.inserted and o.row_id for o in mine)
        for o in mine:
            row, other = (
                await copied.get_by_client_id(o.client_message_id),
                await inserted.get_by_client_id(o.client_message_id),
            )
            assert row is not None and other is not None
            assert row.id == o.row_id
            assert stored(row) == stored(other)
        # Claimed alike, priority first. (Claim order is priority, then enqueue
        # time, no further: the insert's chunks may fall in two milliseconds
        # where the copy's rows share one, so the order within a priority may differ.)
        got = await copied.claim(limit=N, lease_ms=60_000, max_age_ms=BIG, token="t")
        want = await inserted.claim(limit=N, lease_ms=60_000, max_age_ms=BIG, token="t")
        assert sorted(r.client_message_id for r in got) == sorted(r.client_message_id for r in want)
        ranks = [Priority(r.priority or "next").rank for r in got]
        assert ranks == sorted(ranks)


async def test_a_copied_batch_is_stamped_with_the_servers_clock(pg_url: str) -> None:
    async with open_outbox(pg_url, clock=lambda: 5) as ob:  # the host's clock is far off
        backend_of(ob).server_clock = lambda: 1_700_000_123_456
        await ob.accept_many([req(f"m-{i}") for i in range(N)])
        rows = await ob.list(limit=N)
    assert len(rows) == N
    assert {(r.enqueued_at, r.next_attempt_at) for r in rows} == {(1_700_000_123_456, 1_700_000_123_456)}


async def test_a_copied_batch_with_ids_taken_answers_each_row_as_the_insert_does(
    pg_server: PostgresServer, copies: list[int]
) -> None:
    """COPY has no ON CONFLICT: a taken id fails it, and the insert writes
    the batch instead, deciding each row by the idempotency table."""

    async def prepare(ob: Outbox) -> None:
        await ob.accept(req("done"))
        [claimed] = await ob.claim(limit=1, lease_ms=60_000, max_age_ms=BIG, token="t")
        await ob.complete([lc.on_ack(claimed, broker_message_id="b-1", now=0)])
        await ob.accept_many([req("same"), req("other"), req("dropped")])
        dropped = await ob.get_by_client_id("dropped")
        assert dropped is not None
        await ob.drop(dropped.id)

    batch = [req(f"m-{i}") for i in range(N)]
    batch[10] = req("same")  # the same request again: accepted, not inserted
    batch[N - 1] = req("other", payload=b"a different body")  # last: the COPY has done all the rest
    batch[300] = req("done")  # delivered: answered from the row
    batch[301] = req("dropped")  # aborted: a conflict
    batch[400] = req("m-5")  # a repeat inside the batch: decided against the first
    batch[401] = req("m-6", payload=b"not m-6's body")  # conflicts with the batch's own row
    a, b = pg_server.create_database(), pg_server.create_database()
    async with open_outbox(a) as copied, by_insert(b) as inserted:
        await prepare(copied)
        await prepare(inserted)
        mine = await copied.accept_many(batch)
        assert len(copies) == 1
        theirs = await inserted.accept_many(batch)
        assert [answer(o) for o in mine] == [answer(o) for o in theirs]
        kinds = {o.client_message_id: o.kind.value for o in mine}
        assert (kinds["same"], kinds["other"], kinds["done"], kinds["dropped"]) == (
            "accepted_pending",
            "conflict",
            "accepted_done",
            "conflict",
        )
        assert (mine[400].row_id, mine[400].inserted) == (mine[5].row_id, False)
        assert mine[401].kind.value == "conflict"
        assert sum(o.inserted for o in mine) == N - 6
        assert (await copied.counts())["pending"] == (await inserted.counts())["pending"] == N - 6 + 2


async def test_a_batch_sent_again_whole_goes_to_the_insert_before_any_row_is_copied(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer retrying a whole batch: its first id is taken, so no row
    is encoded or sent for a COPY that would fail."""
    sent: list[int] = []
    copy_data = Wire.copy_data

    def counted(self: Wire, data: bytes) -> None:
        sent.append(len(data))
        copy_data(self, data)

    monkeypatch.setattr(Wire, "copy_data", counted)
    batch = [req(f"m-{i}") for i in range(N)]
    async with open_outbox(pg_url) as ob:
        first = await ob.accept_many(batch)
        assert sent
        sent.clear()
        again = await ob.accept_many([*batch[:-1], req("new")])
        assert sent == []
        assert (await ob.counts())["pending"] == N + 1
    assert [(o.row_id, o.inserted) for o in again[:-1]] == [(o.row_id, False) for o in first[:-1]]
    assert again[-1].inserted


async def test_a_repeat_inside_a_copied_batch_is_copied_once_and_answered_from_the_first(
    pg_url: str, copies: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    inserts: list[int] = []
    insert_new_rows = _pipelines.insert_new_rows

    async def counted(*args: Any) -> Any:
        inserts.append(1)
        return await insert_new_rows(*args)

    monkeypatch.setattr(_copy, "insert_new_rows", counted)
    batch = [req(f"m-{i}") for i in range(N)]
    batch[N - 1] = req("m-0")
    async with open_outbox(pg_url) as ob:
        outcomes = await ob.accept_many(batch)
        assert (len(copies), inserts) == (1, [])
        assert (await ob.counts())["pending"] == N - 1
    assert (outcomes[-1].row_id, outcomes[-1].inserted) == (outcomes[0].row_id, False)


async def test_an_invalid_request_late_in_a_big_batch_writes_nothing_and_leaves_the_outbox_working(
    pg_url: str, copies: list[int]
) -> None:
    batch = [req(f"m-{i}") for i in range(N)]
    batch[N - 20] = req("bad", priority="urgent")
    async with open_outbox(pg_url) as ob:
        with pytest.raises(InvalidRequest, match="priority"):
            await ob.accept_many(batch)
        assert copies  # it was under way
        assert (await ob.counts())["pending"] == 0
        # Invalid while the COPY was being started, too.
        early = [req(f"e-{i}") for i in range(N)]
        early[100] = req("bad", priority="urgent")
        with pytest.raises(InvalidRequest, match="priority"):
            await ob.accept_many(early)
        assert (await ob.counts())["pending"] == 0
        outcomes = await ob.accept_many([req(f"m-{i}") for i in range(N)])
        assert all(o.inserted for o in outcomes)
        assert (await ob.counts())["pending"] == N


async def test_a_lane_row_late_in_a_big_batch_has_the_insert_write_it_all_and_the_lane_holds(
    pg_url: str, copies: list[int]
) -> None:
    """The lanes' locks come before any row is written: a batch whose first
    chunk has no lane row but a later one has goes to the insert instead."""
    batch = [req(f"m-{i}") for i in range(N)]
    for i in range(500, 505):
        batch[i] = req(f"lane-{i}", ordering_key="customer-7")
    async with open_outbox(pg_url) as ob:
        outcomes = await ob.accept_many(batch)
        assert len(copies) == 1  # begun, then abandoned
        assert all(o.inserted for o in outcomes)
        claimed = await ob.claim(limit=N, lease_ms=60_000, max_age_ms=BIG, token="t")
    assert len(claimed) == N - 4
    assert [r.client_message_id for r in claimed if r.ordering_key] == ["lane-500"]


async def test_a_batch_whose_first_rows_are_in_a_lane_is_not_copied(pg_url: str, copies: list[int]) -> None:
    batch = [req(f"m-{i}", ordering_key=f"lane-{i % 3}") for i in range(N)]
    async with open_outbox(pg_url) as ob:
        await ob.accept_many(batch)
        claimed = await ob.claim(limit=N, lease_ms=60_000, max_age_ms=BIG, token="t")
    assert copies == []
    assert sorted(r.client_message_id for r in claimed) == ["m-0", "m-1", "m-2"]


async def test_a_copied_batch_wakes_the_workers_of_other_processes(pg_url: str) -> None:
    async with open_outbox(pg_url) as watching, trio.open_nursery() as nursery:
        woken: list[int] = []
        nursery.start_soon(watching.watch, lambda: woken.append(1))
        await wait_until(lambda: backend_of(watching).listening, seconds=5)
        await wait_until(lambda: bool(woken), seconds=5)  # once on connecting, for what it missed
        woken.clear()
        async with open_outbox(pg_url) as other:
            await other.accept_many([req(f"m-{i}") for i in range(N)])
            await wait_until(lambda: bool(woken), seconds=5)
        nursery.cancel_scope.cancel()


async def test_concurrent_big_batches_of_the_same_ids_make_one_row_each(pg_url: str) -> None:
    """The second COPY waits on the first's ids, fails when it commits, and
    its batch is answered from the first's rows."""
    batch = [req(f"m-{i}") for i in range(N)]
    answers: list[Sequence[AcceptOutcome]] = []
    async with open_outbox(pg_url) as one, open_outbox(pg_url) as two:

        async def accept(ob: Outbox) -> None:
            answers.append(await ob.accept_many(batch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept, one)
            nursery.start_soon(accept, two)
        assert (await one.counts())["pending"] == N
    first, second = answers
    for a, b in zip(first, second, strict=True):
        assert a.kind == b.kind == OutcomeKind.ACCEPTED_PENDING
        assert a.row_id == b.row_id
        assert a.inserted != b.inserted


async def test_a_copied_batch_is_one_transaction_committed_at_the_sessions_durability(
    pg_url: str, copies: list[int]
) -> None:
    """Nothing of it is visible before it is all in; the COPY sets nothing
    of its own, so its commit waits for the WAL flush as the pool's
    sessions do for accepts (synchronous_commit on)."""
    async with open_outbox(pg_url) as ob, open_outbox(pg_url) as reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ob.accept_many, [req(f"m-{i}") for i in range(5 * N)])
            counts: list[int] = []
            while not counts or counts[-1] < 5 * N:
                counts.append((await reader.counts())["pending"])
        assert copies
        assert set(counts) <= {0, 5 * N}
        setting = await backend_of(ob)._pool.run(
            lambda conn: conn.execute("SHOW synchronous_commit").fetchone()
        )
    assert setting == ("on",)


def test_copy_rows_encodes_every_column_as_postgresqls_binary_copy_reads_it() -> None:
    """A chunk whose columns mix repeated values, NULLs and distinct ones."""
    from trio_drain._validate import prepare_row

    rows = [prepare_row(r, now=0, row_id=f"id-{i}") for i, r in enumerate(varied("c", 10))]
    data = _copy.copy_rows(rows, 42)
    # Walk the tuples back: each is a field count and length-prefixed fields.
    at, decoded = 0, []
    while at < len(data):
        fields = int.from_bytes(data[at : at + 2], "big")
        at += 2
        values: list[bytes | None] = []
        for _ in range(fields):
            size = int.from_bytes(data[at : at + 4], "big", signed=True)
            at += 4
            values.append(None if size < 0 else data[at : at + size])
            at += max(size, 0)
        decoded.append(dict(zip(_copy.COPY_COLUMNS, values, strict=True)))
    assert len(decoded) == len(rows)
    for row, got in zip(rows, decoded, strict=True):
        assert got["enqueued_at"] == got["next_attempt_at"] == (42).to_bytes(8, "big")
        assert got["attempts"] == (0).to_bytes(4, "big")
        assert got["status"] == Status.PENDING.value.encode()
        assert got["payload"] == row.payload and got["request_fingerprint"] == row.request_fingerprint
        for name in ("id", "client_message_id", "mesh", "target_spec", "priority", "nonce", "ciphertext"):
            value = getattr(row, name)
            assert got[name] == (None if value is None else value.encode())
