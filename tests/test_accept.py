"""Idempotent accept against a real SQLite file (section 3 of the spec)."""

from __future__ import annotations

import itertools
import os
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_drain import (
    AcceptOutcome,
    InvalidRequest,
    Outbox,
    OutcomeKind,
    SendRequest,
    Status,
    open_outbox,
    request_fingerprint,
)
from trio_drain._ids import uuid7, uuid7s
from trio_drain._validate import prepare_row

REQ = SendRequest(mesh="alpha", target_spec="#general", payload=b"hi", client_message_id="m-1")


async def test_a_new_request_is_inserted_pending(outbox: Outbox) -> None:
    outcome = await outbox.accept(REQ)
    assert (outcome.kind, outcome.code, outcome.inserted) == (OutcomeKind.ACCEPTED_PENDING, 202, True)
    row = await outbox.get_by_client_id("m-1")
    assert row is not None
    assert (row.status, row.attempts, row.mesh, row.target_spec, row.priority) == (
        Status.PENDING,
        0,
        "alpha",
        "#general",
        "next",
    )
    assert row.next_attempt_at == row.enqueued_at
    assert row.request_fingerprint == request_fingerprint(
        destination_kind="topic", destination_ref="general", payload=b"hi"
    )
    assert outcome.row_id == row.id


async def test_the_same_request_again_is_accepted_without_a_second_row(outbox: Outbox) -> None:
    first = await outbox.accept(REQ)
    again = await outbox.accept(REQ)
    assert (again.kind, again.code, again.inserted, again.row_id) == (
        OutcomeKind.ACCEPTED_PENDING,
        202,
        False,
        first.row_id,
    )
    assert (await outbox.counts())["pending"] == 1


async def test_a_different_request_under_the_same_id_conflicts(outbox: Outbox) -> None:
    first = await outbox.accept(REQ)
    row = await outbox.get_by_client_id("m-1")
    assert row is not None
    outcome = await outbox.accept(attrs.evolve(REQ, payload=b"other"))
    assert (outcome.kind, outcome.code, outcome.reason) == (
        OutcomeKind.CONFLICT,
        409,
        "outbox_pending_fingerprint_mismatch",
    )
    assert outcome.fingerprint_prefix == row.request_fingerprint[:8].hex()
    assert outcome.row_id == first.row_id
    stored = await outbox.get_by_client_id("m-1")
    assert stored is not None and stored.payload == b"hi"


async def test_a_done_row_answers_200_with_the_broker_message_id(clocked_outbox: Outbox) -> None:
    ob = clocked_outbox
    await ob.accept(REQ)
    (row,) = await ob.claim(limit=1, lease_ms=1000, max_age_ms=10**9, token="t")
    from trio_drain import _lifecycle as lc

    await ob.complete([lc.on_ack(row, broker_message_id="b-42", now=ob.clock())])
    outcome = await ob.accept(REQ)
    assert (outcome.kind, outcome.code, outcome.broker_message_id) == (OutcomeKind.ACCEPTED_DONE, 200, "b-42")


async def test_an_inflight_row_answers_accepted_inflight(clocked_outbox: Outbox) -> None:
    await clocked_outbox.accept(REQ)
    await clocked_outbox.claim(limit=1, lease_ms=1000, max_age_ms=10**9, token="t")
    assert (await clocked_outbox.accept(REQ)).kind is OutcomeKind.ACCEPTED_INFLIGHT


async def test_a_dropped_row_conflicts_and_its_id_is_never_released(outbox: Outbox) -> None:
    outcome = await outbox.accept(REQ)
    assert outcome.row_id is not None
    await outbox.drop(outcome.row_id)
    again = await outbox.accept(REQ)
    assert (again.kind, again.reason) == (OutcomeKind.CONFLICT, "outbox_aborted_fingerprint_match")
    assert sum((await outbox.counts()).values()) == 1


async def test_ids_are_minted_sortable_when_none_is_given(outbox: Outbox) -> None:
    outcomes = [await outbox.accept(attrs.evolve(REQ, client_message_id=None)) for _ in range(5)]
    ids = [o.client_message_id for o in outcomes]
    assert len(set(ids)) == 5
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_ids_minted_in_a_batch_count_up_and_stay_uuid7() -> None:
    before = uuid7()
    batch = uuid7s(1000)
    after = uuid7()
    assert before < batch[0] and batch == sorted(set(batch)) and batch[-1] < after
    parsed = [uuid.UUID(i) for i in batch]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    assert all(b.int - a.int == 1 for a, b in itertools.pairwise(parsed))  # a counter after a random start


def test_batch_ids_stay_right_where_their_low_bits_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_drain import _ids

    ms = 1_700_000_000_000
    start = (1 << 74) - 3  # random bits a few short of all ones: the low 48 bits wrap, then the rest
    monkeypatch.setattr(_ids, "_last", 0)
    monkeypatch.setattr(_ids, "wall_clock_ms", lambda: ms)
    monkeypatch.setattr(_ids, "random_bytes", lambda n: (start << 6).to_bytes(n, "big"))
    batch = _ids.uuid7s(6)

    def expected(candidate: int) -> str:
        high, rand = candidate >> 74, candidate & ((1 << 74) - 1)
        value = (high << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
        return str(uuid.UUID(int=value))

    first = (ms << 74) | start
    assert batch == [expected(first + i) for i in range(6)]
    assert batch == sorted(batch) and {uuid.UUID(i).version for i in batch} == {7}


def test_random_bytes_come_from_the_os_a_pool_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_drain._ids import _RandomPool

    reads: list[bytes] = []
    rng = random.Random(5)

    def urandom(n: int) -> bytes:
        reads.append(rng.randbytes(n))
        return reads[-1]

    monkeypatch.setattr(os, "urandom", urandom)
    pool = _RandomPool()
    taken = [pool.take(24) for _ in range(200)]  # 4,800 bytes: the pool is read twice
    assert [len(r) for r in reads] == [4096, 4096]
    assert all(len(t) == 24 for t in taken)
    # In order, nothing handed out twice; a read's tail too short for a take is left.
    assert b"".join(taken[:170]) == reads[0][:4080]
    assert b"".join(taken[170:]) == reads[1][:720]
    assert (
        pool.take(5000) == reads[-1] and len(reads[-1]) == 5000
    )  # more than a pool: a read of its own  # more than a pool: one read of its own


def test_each_thread_draws_on_a_random_pool_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_drain._ids import _RandomPool

    reads: list[tuple[str, bytes]] = []
    rng = random.Random(7)

    def urandom(n: int) -> bytes:
        reads.append((threading.current_thread().name, rng.randbytes(n)))
        return reads[-1][1]

    monkeypatch.setattr(os, "urandom", urandom)
    pool = _RandomPool()
    here = pool.take(16)
    there: list[bytes] = []
    worker = threading.Thread(target=lambda: there.append(pool.take(16)), name="other")
    worker.start()
    worker.join()
    assert [name for name, _ in reads] == [threading.current_thread().name, "other"]
    assert here == reads[0][1][:16] and there == [reads[1][1][:16]]
    assert pool.take(16) == reads[0][1][16:32]  # this thread's pool carries on where it was


def test_random_uuids_are_version_4_and_differ() -> None:
    from trio_drain._ids import random_uuid

    made = [random_uuid() for _ in range(2000)]
    parsed = [uuid.UUID(u) for u in made]
    assert {(u.version, u.variant) for u in parsed} == {(4, uuid.RFC_4122)}
    assert [str(u) for u in parsed] == made  # canonical text
    assert len(set(made)) == len(made)


async def test_accept_many_is_one_transaction_and_sees_its_own_rows(outbox: Outbox) -> None:
    reqs = [attrs.evolve(REQ, client_message_id=f"m-{i}") for i in range(100)]
    outcomes = await outbox.accept_many([*reqs, reqs[0], attrs.evolve(reqs[1], payload=b"x")])
    assert [o.kind for o in outcomes[:100]] == [OutcomeKind.ACCEPTED_PENDING] * 100
    assert outcomes[100].kind is OutcomeKind.ACCEPTED_PENDING and not outcomes[100].inserted
    assert outcomes[101].kind is OutcomeKind.CONFLICT
    assert (await outbox.counts())["pending"] == 100


async def test_a_batch_retried_in_part_answers_each_row_by_its_own_state(outbox: Outbox) -> None:
    first = [attrs.evolve(REQ, client_message_id=f"r-{i}") for i in range(3)]
    await outbox.accept_many(first)
    again = [*first, attrs.evolve(REQ, client_message_id="r-new"), attrs.evolve(first[2], payload=b"other")]
    outcomes = await outbox.accept_many(again)
    assert [(o.kind, o.inserted) for o in outcomes] == [
        (OutcomeKind.ACCEPTED_PENDING, False),
        (OutcomeKind.ACCEPTED_PENDING, False),
        (OutcomeKind.ACCEPTED_PENDING, False),
        (OutcomeKind.ACCEPTED_PENDING, True),
        (OutcomeKind.CONFLICT, False),
    ]
    assert outcomes[4].reason == "outbox_pending_fingerprint_mismatch"
    assert (await outbox.counts())["pending"] == 4


async def test_concurrent_accepts_of_one_id_make_one_row(outbox: Outbox) -> None:
    results = []

    async def one() -> None:
        results.append(await outbox.accept(REQ))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert sum(r.inserted for r in results) == 1
    assert {r.row_id for r in results} == {results[0].row_id}
    assert (await outbox.counts())["pending"] == 1


async def test_concurrent_accepts_share_commits(db_path: Path) -> None:
    # SQLite's group commit is ours to prove; PostgreSQL shares WAL flushes
    # of concurrent commits inside the server.
    async with open_outbox(db_path) as outbox:
        await _share_commits(outbox)


async def _share_commits(outbox: Outbox) -> None:
    backend = outbox.backend
    before = backend.statistics()  # type: ignore[attr-defined]

    async def one(i: int) -> None:
        await outbox.accept(attrs.evolve(REQ, client_message_id=f"c-{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(one, i)
    after = backend.statistics()  # type: ignore[attr-defined]
    batches, ops = after.transactions - before.transactions, after.operations - before.operations
    assert ops == 64
    assert batches < 64, "64 concurrent accepts should have shared at least one commit"
    assert (await outbox.counts())["pending"] == 64


BAD = [
    ("priority", attrs.evolve(REQ, priority="urgent"), "priority"),
    ("oversized payload", attrs.evolve(REQ, payload=b"x" * (1024 * 1024 + 1)), "limit"),
    ("empty target", attrs.evolve(REQ, target_spec=""), "target_spec"),
    ("blank target", attrs.evolve(REQ, target_spec="   "), "target_spec"),
    ("non-JSON meta", attrs.evolve(REQ, meta={"a": object()}), "meta"),
    ("meta not an object", attrs.evolve(REQ, meta=[1, 2]), "meta"),  # type: ignore[arg-type]
    ("NaN in meta", attrs.evolve(REQ, meta={"a": float("nan")}), "meta"),
    ("payload not bytes", attrs.evolve(REQ, payload="hi"), "payload"),  # type: ignore[arg-type]
    ("nonce without ciphertext", attrs.evolve(REQ, nonce="AAAA"), "nonce"),
    ("ciphertext not base64", attrs.evolve(REQ, nonce="AAAA", ciphertext="not base64!"), "ciphertext"),
    ("bad session key", attrs.evolve(REQ, sender_session_pubkey="xyz"), "sender_session_pubkey"),
    ("empty client id", attrs.evolve(REQ, client_message_id=""), "client_message_id"),
    ("control chars in id", attrs.evolve(REQ, client_message_id="a\nb"), "client_message_id"),
    (
        "bad destination kind",
        attrs.evolve(REQ, destination_kind="room", destination_ref="x"),
        "destination_kind",
    ),
    ("half a destination", attrs.evolve(REQ, destination_kind="topic"), "destination"),
]


@pytest.mark.parametrize(("case", "request_", "message"), BAD, ids=[b[0] for b in BAD])
async def test_bad_requests_are_refused_and_write_nothing(
    outbox: Outbox, case: str, request_: SendRequest, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        await outbox.accept(request_)
    assert sum((await outbox.counts()).values()) == 0
    # The id was not consumed: a good request under it goes through.
    assert (await outbox.accept(REQ)).inserted


# A lone surrogate: a str Python holds but no UTF-8 (so no database) can.
LONE = "\ud800"
UNENCODABLE = [
    ("client_message_id", attrs.evolve(REQ, client_message_id=f"m-{LONE}")),
    ("target_spec", attrs.evolve(REQ, target_spec=f"#gen{LONE}")),
    ("mesh", attrs.evolve(REQ, mesh=f"alpha{LONE}")),
    ("reply_to_id", attrs.evolve(REQ, reply_to_id=f"r{LONE}")),
    ("destination_ref", attrs.evolve(REQ, destination_kind="topic", destination_ref=f"x{LONE}")),
    ("nonce", attrs.evolve(REQ, nonce=f"AAAA{LONE}", ciphertext="AAAA")),
    ("ciphertext", attrs.evolve(REQ, nonce="AAAA", ciphertext=f"AAAA{LONE}")),
    ("meta value", attrs.evolve(REQ, meta={"a": [{"b": f"x{LONE}"}]})),
    ("meta key", attrs.evolve(REQ, meta={f"k{LONE}": 1})),
    ("priority", attrs.evolve(REQ, priority=f"next{LONE}")),
    ("destination_kind", attrs.evolve(REQ, destination_kind=f"topic{LONE}", destination_ref="x")),
    ("sender_session_pubkey", attrs.evolve(REQ, sender_session_pubkey="ab" * 31 + f"a{LONE}")),
]


@pytest.mark.parametrize(("field", "request_"), UNENCODABLE, ids=[u[0] for u in UNENCODABLE])
def test_text_with_no_utf8_form_is_refused_by_validation(field: str, request_: SendRequest) -> None:
    with pytest.raises(InvalidRequest, match=field.split()[0]):
        prepare_row(request_, now=0)


async def test_an_unencodable_request_fails_alone_among_concurrent_accepts(outbox: Outbox) -> None:
    # Ten accepts at once share a commit on SQLite; the one whose id has no
    # UTF-8 form is refused before anything is written, and the nine others
    # go in (they used to fail with it, all raising one UnicodeEncodeError).
    results: dict[int, AcceptOutcome | Exception] = {}

    async def accept(i: int) -> None:
        cid = f"m-{i}{LONE}" if i == 6 else f"m-{i}"
        try:
            results[i] = await outbox.accept(attrs.evolve(REQ, client_message_id=cid))
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(accept, i)
    bad = results.pop(6)
    assert isinstance(bad, InvalidRequest) and "client_message_id" in str(bad)
    assert all(isinstance(r, AcceptOutcome) and r.inserted for r in results.values()), results
    assert (await outbox.counts())["pending"] == 9
    assert {r.client_message_id for r in await outbox.list(limit=20)} == {
        f"m-{i}" for i in range(10) if i != 6
    }


async def test_one_bad_request_in_accept_many_writes_none(outbox: Outbox) -> None:
    with pytest.raises(InvalidRequest):
        await outbox.accept_many([attrs.evolve(REQ, client_message_id="ok"), attrs.evolve(REQ, priority="x")])
    assert sum((await outbox.counts()).values()) == 0


async def test_list_rejects_unknown_status_and_bad_limits(outbox: Outbox) -> None:
    with pytest.raises(InvalidRequest, match="unknown status"):
        await outbox.list("stuck")
    with pytest.raises(InvalidRequest, match="limit"):
        await outbox.list(limit=0)


async def test_a_row_is_durable_once_accept_returns(db_path: Path) -> None:
    async with open_outbox(db_path) as ob:
        await ob.accept(REQ)
    async with open_outbox(db_path) as ob:
        row = await ob.get_by_client_id("m-1")
        assert row is not None and row.payload == b"hi"


@pytest.mark.parametrize("bad", ["\x1b[2J", "\x9b31m", "a\u202eb", "a\u2066b", "line\u2028break", "\x7f"])
@pytest.mark.parametrize("field", ["client_message_id", "mesh", "target_spec", "reply_to_id"])
async def test_ids_meshes_and_targets_refuse_controls_c1_and_bidi_characters(
    outbox: Outbox,
    field: str,
    bad: str,
) -> None:
    fields: dict[str, Any] = {
        "mesh": "alpha",
        "target_spec": "*",
        "payload": b"x",
        "client_message_id": "c-1",
    }
    fields[field] = f"x{bad}y"
    with pytest.raises(InvalidRequest, match="control or bidi"):
        await outbox.accept(SendRequest(**fields))
    assert await outbox.counts() == dict.fromkeys(("pending", "inflight", "done", "dead", "aborted"), 0)
