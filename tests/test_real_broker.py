"""The seed's real broker (claudemesh), as the reference broker's compat mode
plays it from what was observed running it (SPEC section 5): getting in,
its ack shapes and texts, its rate limit, its size limit, no dedupe, and
silence where its handler throws. The rate-limit and delivery tests run
against both modes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_drain import (
    DrainConfig,
    Faults,
    InvalidRequest,
    MeshIdentity,
    OutgoingMessage,
    SendRequest,
    SessionIdentity,
    Status,
    WebSocketBroker,
    generate_secret_key,
    open_outbox,
)
from trio_drain._brokers._identity import public_key_hex
from trio_drain._brokers._wire import SendResult, classify_ack
from trio_drain._clock import wall_clock_ms
from trio_drain._crashpoints import ENV
from trio_drain._reference_broker import RateLimit

from . import procs
from .builders import SESSION, mesh_identity, message, session_identity
from .helpers import QUICK_RETRIES, Rig, start_server, wait_until, websocket_client

FAST = QUICK_RETRIES
MODES = [None, "claudemesh"]


#: An open broker: any member may connect.
start = functools.partial(start_server, open_mode=True)


async def connected(
    nursery: trio.Nursery, url: str, identity: MeshIdentity | SessionIdentity
) -> WebSocketBroker:
    broker = WebSocketBroker(url, identity, hello_timeout=1.0, reconnect_backoff=[0.05])
    await nursery.start(broker.run)
    return broker


# -- getting in ---------------------------------------------------------------------------------


def test_both_hellos_carry_cwd_and_a_session_id_stable_per_process_and_key() -> None:
    mesh, session = mesh_identity(), session_identity()
    first, again = mesh.hello(1_000), mesh.hello(2_000)
    assert first["cwd"] == os.getcwd()
    assert first["sessionId"] == again["sessionId"], "a reconnect must be recognised as the same process"
    assert str(os.getpid()) in first["sessionId"]
    hello = session.hello(1_000)
    assert hello["cwd"] == os.getcwd() and hello["sessionId"] == session.hello(5_000)["sessionId"]
    # One process's member and session connections in one mesh must not
    # look like a reconnect of each other (the broker would close the first).
    assert hello["sessionId"] != first["sessionId"]


@pytest.mark.parametrize("compat", MODES)
async def test_a_hello_without_cwd_is_refused_and_the_claudemesh_broker_never_answers_it(
    compat: str | None,
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, compat=compat)
    frame = mesh_identity().hello(wall_clock_ms())
    del frame["cwd"]
    async with websocket_client(server.url) as ws:
        await ws.send_message(json.dumps(frame))
        with trio.move_on_after(1.0) as waited:
            answer = json.loads(await ws.get_message())
        if compat:
            assert waited.cancelled_caught, "the real broker logs the failed insert and says nothing"
        else:
            assert answer["type"] == "error" and "cwd" in answer["message"]
    assert server.statistics().hellos_rejected == 1


@pytest.mark.parametrize("compat", MODES)
async def test_mesh_and_session_connections_get_in_and_deliver(compat: str | None, tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        server = await start(nursery, compat=compat)
        mesh = await connected(nursery, server.url, mesh_identity())
        session = await connected(nursery, server.url, session_identity())
        assert mesh.is_open() and session.is_open()
        rig = Rig(outbox, nursery, mesh, config=FAST)
        rig.registry.set_session(public_key_hex(SESSION), session)
        await outbox.accept_many(
            [
                SendRequest(mesh="alpha", target_spec="*", payload=b"m%d" % i, client_message_id=f"m-{i}")
                for i in range(20)
            ]
            + [
                SendRequest(
                    mesh="alpha",
                    target_spec="*",
                    payload=b"s%d" % i,
                    client_message_id=f"s-{i}",
                    sender_session_pubkey=public_key_hex(SESSION),
                )
                for i in range(20)
            ]
        )
        worker = await rig.start()
        await wait_until(lambda: len(server.accepted()) == 40)
        await wait_until(lambda: worker.statistics().acked == 40)
        nursery.cancel_scope.cancel()
    assert set(server.copies().values()) == {1}
    assert mesh.connects == session.connects == 1


# -- what its acks mean ---------------------------------------------------------------------------

REAL_ACKS = [
    ("payload too large: 70001 bytes > MAX_MESSAGE_BYTES=65536", "permanent"),
    ("blocked by recipient grants (sender lacks dm capability)", "permanent"),
    ("rate_limit: max 60 msg/min (burst 10) — slow down", "rate_limited"),
    (
        "no connected peer for target (not online, or targetSpec is your own key without another session)",
        "transient",
    ),
    ("database is not reachable", "transient"),
]


@pytest.mark.parametrize(("error", "meaning"), REAL_ACKS)
def test_the_real_brokers_error_acks_are_classified_by_their_text(error: str, meaning: str) -> None:
    result = classify_ack({"type": "ack", "id": "c", "messageId": "", "queued": False, "error": error})
    found = "rate_limited" if result.rate_limited else "permanent" if result.permanent else "transient"
    assert (result.ok, found, result.error) == (False, meaning, error)


def test_an_overload_is_back_pressure_by_code_whatever_the_permanent_field_says() -> None:
    frame = {
        "type": "ack",
        "id": "c",
        "queued": False,
        "error": "busy",
        "code": "overloaded",
        "permanent": False,
    }
    assert classify_ack(frame) == SendResult.throttled("busy", code="overloaded")
    text_only = {k: v for k, v in frame.items() if k != "permanent"}
    assert classify_ack({**text_only, "code": "x", "error": "payload_too_large"}).permanent
    assert not classify_ack({**frame, "code": "x", "error": "forbidden"}).permanent, (
        "the field wins over the text"
    )


@pytest.mark.parametrize("compat", MODES)
async def test_the_brokers_answers_in_each_mode(compat: str | None, nursery: trio.Nursery) -> None:
    server = await start(nursery, compat=compat, max_message_bytes=200, max_payload=100)
    broker = await connected(nursery, server.url, mesh_identity())
    first = await broker.send(message("a"))
    again = await broker.send(message("a"))
    assert first.ok and again.ok
    big = await broker.send(message("big", ciphertext="QUJD" * 60))
    assert big.permanent and not big.ok
    if compat:
        # No dedupe: the resend is a second message; no `duplicate` flag.
        assert not again.duplicate and again.message_id != first.message_id
        assert server.copies()[("mesh-alpha", "a")] == 2 and server.statistics().redelivered == 1
        assert big.code is None and big.error == "payload too large: 273 bytes > MAX_MESSAGE_BYTES=200"
    else:
        assert again.duplicate and again.message_id == first.message_id
        assert server.copies()[("mesh-alpha", "a")] == 1
        assert big.code == "payload_too_large"


async def test_the_brokers_statistics_are_a_frozen_snapshot(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    broker = await connected(nursery, server.url, mesh_identity())
    assert (await broker.send(message("a"))).ok
    snapshot = server.statistics()
    assert (await broker.send(message("b"))).ok
    assert (await broker.send(message("a"))).duplicate
    assert (snapshot.connections, snapshot.accepted, snapshot.duplicates) == (1, 1, 0)
    later = server.statistics()
    assert (later.accepted, later.duplicates) == (2, 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.accepted = 5  # type: ignore[misc]


async def test_a_send_frame_the_claudemesh_broker_cannot_handle_gets_no_answer(nursery: trio.Nursery) -> None:
    server = await start(nursery, compat="claudemesh")
    broker = WebSocketBroker(server.url, mesh_identity(), ack_timeout=0.5)
    await nursery.start(broker.run)
    result = await broker.send(message("odd", priority="urgent"))
    assert (result.ok, result.unanswered, result.error) == (False, True, "ack_timeout")
    assert server.statistics().unanswered == 1 and not server.accepted()


async def test_rows_whose_frame_the_broker_could_not_take_never_leave(tmp_path: Path) -> None:
    """A row written by other software with a priority outside the three
    goes dead at once rather than timing out 25 times."""
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        await outbox.accept(SendRequest(mesh="alpha", target_spec="*", payload=b"x", client_message_id="odd"))
        await outbox.backend._write(  # type: ignore[attr-defined]
            lambda conn: conn.execute("UPDATE outbox SET priority = 'urgent'"), durable=False
        )
        server = await start(nursery, compat="claudemesh")
        await Rig(outbox, nursery, await connected(nursery, server.url, mesh_identity()), config=FAST).start()

        async def dead() -> bool:
            row = await outbox.get_by_client_id("odd")
            return row is not None and row.status is Status.DEAD

        await wait_until(dead)
        nursery.cancel_scope.cancel()
    row = await _row(tmp_path / "o.db", "odd")
    assert row.attempts == 1 and row.last_error is not None and "priority 'urgent'" in row.last_error
    assert server.statistics().unanswered == 0, "nothing was sent"


async def _row(db: Path, cid: str) -> Any:
    async with open_outbox(db) as outbox:
        return await outbox.get_by_client_id(cid)


# -- size: refused at accept ----------------------------------------------------------------------


async def test_accept_refuses_a_request_whose_frame_could_never_fit_the_broker(tmp_path: Path) -> None:
    async with open_outbox(tmp_path / "o.db") as outbox:
        # 49,128 bytes of payload are 65,504 characters of base64; with the
        # nonce's 32 and a target of 1 that is 65,537: one over.
        fits = SendRequest(mesh="alpha", target_spec="*", payload=b"x" * 49_125, client_message_id="fits")
        over = SendRequest(mesh="alpha", target_spec="*", payload=b"x" * 49_128, client_message_id="over")
        assert (await outbox.accept(fits)).accepted
        with pytest.raises(InvalidRequest, match="max_message_bytes"):
            await outbox.accept(over)
        assert await outbox.get_by_client_id("over") is None, "nothing written"
        sealed = SendRequest(
            mesh="alpha",
            target_spec="ab" * 32,
            payload=b"p",
            nonce="A" * 32,
            ciphertext="QUJD" * 16_368,
            client_message_id="sealed",
        )
        with pytest.raises(InvalidRequest, match="65568 characters"):
            await outbox.accept(sealed)
        # The id was not consumed: the same id with a smaller payload goes in.
        assert (
            await outbox.accept(
                SendRequest(mesh="alpha", target_spec="*", payload=b"y", client_message_id="over")
            )
        ).accepted
    async with open_outbox(tmp_path / "o.db", max_message_bytes=1_000_000) as roomy:
        assert (await roomy.accept(over)).kind.value == "conflict", (
            "a larger limit takes it (the id is used now)"
        )


# -- rate limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compat", MODES)
async def test_a_rate_limited_backlog_drains_at_the_allowed_rate_and_nothing_dies(
    compat: str | None,
    tmp_path: Path,
) -> None:
    """A burst of 10, then 20 a second: 80 rows take about 3.5 s, lose no
    attempt and none dies; refusals stay few once the route is paced."""
    n, limit = 80, RateLimit(burst=10, per_minute=1200)
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        server = await start(nursery, compat=compat, faults=Faults(rate_limit=limit))
        rig = Rig(outbox, nursery, await connected(nursery, server.url, mesh_identity()))
        await outbox.accept_many(
            [
                SendRequest(mesh="alpha", target_spec="*", payload=b"r%d" % i, client_message_id=f"r-{i}")
                for i in range(n)
            ]
        )
        worker = rig.worker(DrainConfig(max_inflight=64, poll_interval=0.05, max_attempts=3))
        began = trio.current_time()
        await nursery.start(worker.run)
        await wait_until(lambda: worker.statistics().acked == n, seconds=30)
        took = trio.current_time() - began
        stats = worker.statistics()
        nursery.cancel_scope.cancel()
    assert (await _counts(tmp_path / "o.db"))["dead"] == 0
    allowed = (n - limit.burst) / (limit.per_minute / 60)
    assert allowed * 0.9 <= took <= allowed * 1.6, (took, allowed)
    refused = server.statistics().rate_limited
    assert refused == stats.rate_limited
    # The first window met the burst (16 sends against 10); after that, pacing.
    assert refused <= 16, refused
    assert stats.per_route["mesh:alpha"].rate is not None
    async with open_outbox(tmp_path / "o.db") as outbox:
        rows = await outbox.list(limit=n)
    assert {r.attempts for r in rows} == {1}, "a refusal gives its attempt back"


async def _counts(db: Path) -> dict[str, int]:
    async with open_outbox(db) as outbox:
        return await outbox.counts()


# -- no dedupe: rows whose fate is unknown ---------------------------------------------------------


@pytest.fixture
async def silent_broker(nursery: trio.Nursery) -> AsyncIterator[WebSocketBroker]:
    """A broker that takes every send and answers none: every send's fate is unknown."""
    server = await start(nursery, compat="claudemesh", faults=Faults(drop_ack_rate=1.0))
    yield await connected(nursery, server.url, mesh_identity())


@pytest.mark.parametrize(
    ("fate", "status", "error"),
    [
        ("resend", Status.PENDING, "ack_timeout"),
        ("dead", Status.DEAD, "unknown_fate: ack_timeout"),
    ],
)
async def test_a_send_never_answered_is_resent_or_left_dead_for_review(
    fate: str,
    status: Status,
    error: str,
    tmp_path: Path,
    nursery: trio.Nursery,
    silent_broker: WebSocketBroker,
) -> None:
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox:
        await outbox.accept(SendRequest(mesh="alpha", target_spec="*", payload=b"x", client_message_id="q"))
        config = DrainConfig(
            poll_interval=0.05,
            ack_timeout=0.3,
            lease=5.0,
            backoff_base=30.0,
            backoff_cap=30.0,
            unknown_fate=fate,  # type: ignore[arg-type]
        )
        silent_broker.ack_timeout = 10.0  # the worker's deadline decides
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await Rig(outbox, inner, silent_broker, config=config).start()

                async def moved() -> bool:
                    row = await outbox.get_by_client_id("q")
                    return row is not None and row.last_error is not None

                await wait_until(moved)
                scope.cancel()
        row = await outbox.get_by_client_id("q")
    assert row is not None and (row.status, row.last_error, row.attempts) == (status, error, 1)


# -- as processes: `trio-drain run` against `broker serve --compat claudemesh` ---------------------


@pytest.mark.parametrize("mode", [[], ["--compat", "claudemesh"]], ids=["reference", "claudemesh"])
def test_run_drains_a_backlog_through_a_rate_limited_broker_with_nothing_dead(
    tmp_path: Path,
    mode: list[str],
) -> None:
    n = 100
    db = tmp_path / "o.db"
    procs.fill(db, n)
    broker = procs.Broker(tmp_path, "--rate-limit", "10/1200", *mode).start()
    config = procs.write_config(
        tmp_path / "c.toml", broker.url, generate_secret_key(), drain={"max_inflight": 64, "max_attempts": 2}
    )
    try:
        worker = procs.start_run(db, config)
        procs.wait_for_done(db, n, 60, worker)
        (err,) = procs.stop_all(worker)
    finally:
        broker.stop()
    assert procs.counts(db) == {"pending": 0, "inflight": 0, "done": n, "dead": 0, "aborted": 0}, err
    assert "pacing it at" in err, "the log says the route is paced"
    assert sum(broker.sent().values()) - n <= 20, "few refusals"


@pytest.mark.parametrize("fate", ["resend", "dead"])
def test_after_a_crash_between_send_and_record_the_operator_chooses_resend_or_review(
    tmp_path: Path,
    fate: str,
) -> None:
    """The claudemesh broker does not dedupe: a row sent, acked and not yet
    recorded when the drain died is delivered twice if resent. With
    unknown_fate = "dead" no row is sent twice; the rows whose fate was
    unknown wait, dead with a clear reason, for an operator to check."""
    n = 200
    db = tmp_path / "o.db"
    procs.fill(db, n)
    broker = procs.Broker(tmp_path, "--compat", "claudemesh", "--ack-delay", "0.005").start()
    config = procs.write_config(
        tmp_path / "c.toml",
        broker.url,
        generate_secret_key(),
        drain={"max_inflight": 16, **procs.SHORT_LEASES},
        extra="",
    )
    config.write_text(config.read_text().replace("[drain]\n", f'[drain]\nunknown_fate = "{fate}"\n'))
    try:
        crashing = subprocess.Popen(
            [*procs.CLI, "run", "--db", str(db), "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, ENV: "ack_before_record@10"},
        )
        _, err = crashing.communicate(timeout=60)
        assert crashing.returncode == -signal.SIGKILL, err
        worker = procs.start_run(db, config)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c = procs.counts(db)
            if c["done"] + c["dead"] == n:
                break
            time.sleep(0.1)
        (err,) = procs.stop_all(worker)
    finally:
        broker.stop()
    statuses, copies = procs.statuses(db, "last_error"), broker.copies()
    twice = sorted(cid for cid, k in copies.items() if k > 1)
    unknown = sorted(cid for cid, (status, _) in statuses.items() if status == "dead")
    if fate == "resend":
        assert {s for s, _ in statuses.values()} == {"done"}, err
        assert twice, (
            "the rows in flight at the crash were delivered twice: the hazard this option exists for"
        )
    else:
        assert not twice, f"nothing may go out twice: {twice[:5]}"
        assert unknown, "the crash left rows of unknown fate"
        assert {statuses[cid][1] for cid in unknown} == {"unknown_fate: lease_expired"}
        assert {s for s, _ in statuses.values()} == {"done", "dead"}
        assert len(unknown) <= 16, "only what was in flight"
    assert "Traceback" not in err


async def test_a_paced_route_holds_back_only_its_own_rows(tmp_path: Path) -> None:
    """Mesh alpha's broker refuses past 10 a second; beta's takes all. Beta's
    backlog drains at full speed while alpha's goes at its pace, and alpha's
    rows are claimed no faster than it may send (no churn of give-backs)."""
    from .helpers import FakeBroker

    bucket = {"tokens": 5.0, "at": 0.0}

    def limited(m: OutgoingMessage) -> SendResult | None:
        now = trio.current_time()
        bucket["tokens"] = min(5.0, bucket["tokens"] + (now - bucket["at"]) * 10)
        bucket["at"] = now
        if bucket["tokens"] < 1:
            return SendResult.throttled("rate_limit: max 600 msg/min (burst 5)")
        bucket["tokens"] -= 1
        return None

    alpha, beta = FakeBroker(script=limited), FakeBroker()
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        bucket["at"] = trio.current_time()
        rig = Rig(outbox, nursery, alpha)
        rig.registry.set_mesh("beta", beta)
        await outbox.accept_many(
            [
                SendRequest(mesh=m, target_spec="*", payload=b"x", client_message_id=f"{m}-{i}")
                for i in range(300)
                for m in ("alpha", "beta")
            ][:330]
        )
        worker = await rig.start(DrainConfig(max_inflight=64, poll_interval=0.05))
        await wait_until(
            lambda: (
                worker.statistics().per_route.get("mesh:beta") is not None
                and worker.statistics().per_route["mesh:beta"].acked == 165
            ),
            seconds=10,
        )
        assert worker.statistics().per_route["mesh:alpha"].acked < 60, "alpha is paced meanwhile"
        await wait_until(lambda: worker.statistics().acked == 330, seconds=30)
        stats = worker.statistics()
        nursery.cancel_scope.cancel()
    alpha_stats = stats.per_route["mesh:alpha"]
    assert alpha_stats.rate is not None and 5 <= alpha_stats.rate <= 10
    assert alpha_stats.rate_limited <= 20, alpha_stats
    # Give-backs are the refusals plus, once, the rows slow start held when
    # the route was paced (at most a claim's worth); pacing itself claims
    # no row it cannot send, so the count does not grow with the backlog.
    assert stats.given_back <= stats.rate_limited + 32, stats


def test_an_explicit_permanent_wins_and_only_the_text_before_a_parenthesis_is_judged() -> None:
    permanent = classify_ack(
        {"type": "ack", "id": "c", "queued": False, "error": "rate_limit: banned", "permanent": True}
    )
    assert permanent.permanent and not permanent.rate_limited
    quoted = classify_ack(
        {
            "type": "ack",
            "id": "c",
            "queued": False,
            "error": "no connected peer for target (oauth-bot, rate_limit-tester)",
        }
    )
    assert not quoted.permanent and not quoted.rate_limited


async def test_a_claudemesh_hello_without_cwd_is_left_open_not_timed_out(nursery: trio.Nursery) -> None:
    server = await start(nursery, compat="claudemesh")
    frame = mesh_identity().hello(wall_clock_ms())
    del frame["cwd"]
    async with websocket_client(server.url) as ws:
        await ws.send_message(json.dumps(frame))
        with trio.move_on_after(6.0) as waited:  # past the broker's 5 s hello deadline
            await ws.get_message()
        assert waited.cancelled_caught and not ws.closed, "the socket is left open, silent"


async def test_a_members_mesh_and_session_routes_share_one_pace(tmp_path: Path) -> None:
    """The broker limits the member, not the connection: rows of its mesh
    socket and of its session drain together at the member's rate."""
    n, limit = 60, RateLimit(burst=10, per_minute=1200)
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        server = await start(nursery, compat="claudemesh", faults=Faults(rate_limit=limit))
        rig = Rig(outbox, nursery, await connected(nursery, server.url, mesh_identity()))
        rig.registry.set_session(
            public_key_hex(SESSION), await connected(nursery, server.url, session_identity())
        )
        await outbox.accept_many(
            [
                SendRequest(mesh="alpha", target_spec="*", payload=b"m", client_message_id=f"m-{i}")
                for i in range(n // 2)
            ]
            + [
                SendRequest(
                    mesh="alpha",
                    target_spec="*",
                    payload=b"s",
                    client_message_id=f"s-{i}",
                    sender_session_pubkey=public_key_hex(SESSION),
                )
                for i in range(n // 2)
            ]
        )
        worker = await rig.start(DrainConfig(max_inflight=64, poll_interval=0.05))
        await wait_until(lambda: worker.statistics().acked == n, seconds=30)
        stats = worker.statistics()
        nursery.cancel_scope.cancel()
    assert stats.rate_limited <= 16, stats
    paced = {name: r.rate for name, r in stats.per_route.items()}
    assert len(set(paced.values())) == 1 and None not in paced.values(), paced


async def test_a_route_in_slow_start_does_not_hold_the_window_against_other_routes(tmp_path: Path) -> None:
    from .helpers import FakeBroker

    slow, quick = FakeBroker(delay=30.0), FakeBroker()
    async with open_outbox(tmp_path / "o.db", durability="normal") as outbox, trio.open_nursery() as nursery:
        rig = Rig(outbox, nursery, slow, mesh="slow")
        rig.registry.set_mesh("quick", quick)
        await outbox.accept_many(
            [
                SendRequest(mesh="slow", target_spec="*", payload=b"x", client_message_id=f"s-{i}")
                for i in range(200)
            ]
        )
        await outbox.accept_many(
            [
                SendRequest(mesh="quick", target_spec="*", payload=b"x", client_message_id=f"q-{i}")
                for i in range(100)
            ]
        )
        await rig.start(DrainConfig(max_inflight=64, poll_interval=0.05, ack_timeout=20.0, lease=60.0))
        # The slow broker answers nothing for 30 s: its route holds 16 sends
        # and the rows of its first claim; the quick route gets the rest.
        await wait_until(lambda: len(quick.accepted) == 100, seconds=5)
        assert len(slow.received) == 16
        nursery.cancel_scope.cancel()
