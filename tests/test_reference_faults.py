"""The reference broker's faults for the adaptive window: a capacity past
which it answers ``overloaded`` at once, and an ack delay that changes while
it runs (`Faults(capacity=K)`, `Faults(ack_delay_schedule=...)`, and their
command-line flags `--capacity K`, `--ack-delay-schedule MS@S,...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from trio_drain import ConfigError, Faults, OutgoingMessage, SendResult, WebSocketBroker
from trio_drain._reference_broker import AckDelaySchedule

from .builders import mesh_identity, message
from .helpers import start_server, websocket_client
from .procs import assert_clean_error, run, start_broker


async def _sends(broker: WebSocketBroker, messages: list[OutgoingMessage]) -> list[tuple[float, SendResult]]:
    """Send all at once; each one's answer, with the seconds it took."""
    answers: list[tuple[float, SendResult]] = [(0.0, SendResult.no_answer("-"))] * len(messages)
    began = trio.current_time()

    async def one(i: int) -> None:
        result = await broker.send(messages[i])
        answers[i] = (trio.current_time() - began, result)

    async with trio.open_nursery() as nursery:
        for i in range(len(messages)):
            nursery.start_soon(one, i)
            await trio.lowlevel.checkpoint()  # in this order on the wire
    return answers


async def test_past_its_capacity_a_connection_is_answered_overloaded_at_once() -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, open_mode=True, faults=Faults(capacity=3, ack_delay=0.3))
        broker = WebSocketBroker(server.url, mesh_identity())
        await nursery.start(broker.run)
        answers = await _sends(broker, [message(f"m-{i}") for i in range(5)])
        accepted = [(t, r) for t, r in answers if r.ok]
        refused = [(t, r) for t, r in answers if not r.ok]
        assert len(accepted) == 3 and all(t >= 0.29 for t, _ in accepted)
        assert len(refused) == 2 and all(t < 0.2 for t, _ in refused)
        # Back-pressure, not a failure: transient, its code says what it is.
        assert {(r.code, r.rate_limited, r.permanent) for _, r in refused} == {("overloaded", True, False)}
        assert server.statistics().overloaded == 2
        assert sorted(cid for _, cid in server.accepted()) == sorted(
            f"m-{i}" for i, (_, r) in enumerate(answers) if r.ok
        )
        # Once the acks are out, the connection takes sends again.
        (_, again), *_ = await _sends(broker, [message("m-late")])
        assert again.ok
        nursery.cancel_scope.cancel()


async def test_the_capacity_counts_each_connection_on_its_own() -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, open_mode=True, faults=Faults(capacity=2, ack_delay=0.3))
        first = WebSocketBroker(server.url, mesh_identity())
        second = WebSocketBroker(server.url, mesh_identity(member="member-2"))
        await nursery.start(first.run)
        await nursery.start(second.run)
        results: list[list[tuple[float, SendResult]]] = []

        async def both(broker: WebSocketBroker, prefix: str) -> None:
            results.append(await _sends(broker, [message(f"{prefix}-{i}") for i in range(2)]))

        async with trio.open_nursery() as senders:
            senders.start_soon(both, first, "a")
            senders.start_soon(both, second, "b")
        assert all(r.ok for answers in results for _, r in answers)
        assert server.statistics().overloaded == 0
        nursery.cancel_scope.cancel()


async def test_the_ack_delay_follows_its_schedule() -> None:
    schedule = [(0.0, 0.0), (0.5, 0.3), (1.0, 0.0)]
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, open_mode=True, faults=Faults(ack_delay_schedule=schedule))
        began = trio.current_time()  # the schedule counts from about here
        broker = WebSocketBroker(server.url, mesh_identity())
        await nursery.start(broker.run)
        took = []
        for i, at in enumerate((0.1, 0.6, 1.4)):
            await trio.sleep_until(began + at)
            (t, result), *_ = await _sends(broker, [message(f"m-{i}")])
            assert result.ok
            took.append(t)
        assert took[0] < 0.15 and 0.29 <= took[1] < 0.45 and took[2] < 0.15, took
        nursery.cancel_scope.cancel()


async def test_when_the_delay_shortens_new_acks_overtake_the_old_ones() -> None:
    faults = Faults(ack_delay_schedule="500@0,0@0.3")  # 0.5 s, then none from 0.3 s
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, open_mode=True, faults=faults)
        began = trio.current_time()
        async with websocket_client(server.url) as ws:
            await ws.send_message(json.dumps(mesh_identity().hello(_wall_ms())))
            assert json.loads(await ws.get_message())["type"] == "hello_ack"
            await ws.send_message(message("slow").to_json())
            await trio.sleep_until(began + 0.35)
            await ws.send_message(message("fast").to_json())
            order = [json.loads(await ws.get_message())["id"] for _ in range(2)]
        assert order == ["fast", "slow"]
        nursery.cancel_scope.cancel()


def _wall_ms() -> int:
    from trio_drain._clock import wall_clock_ms

    return wall_clock_ms()


def test_a_schedule_reads_milliseconds_at_seconds() -> None:
    schedule = AckDelaySchedule.parse("1@0,20@5,1@10")
    assert schedule.steps == ((0.0, 0.001), (5.0, 0.02), (10.0, 0.001))
    assert [schedule.delay_at(t) for t in (0.0, 4.99, 5.0, 9.0, 10.0, 1e6)] == [
        0.001,
        0.001,
        0.02,
        0.02,
        0.001,
        0.001,
    ]
    assert AckDelaySchedule.parse("5@2").delay_at(1.0) == 0.0  # none before the first step
    assert Faults(ack_delay_schedule="1@0,20@5").ack_delay_schedule == ((0.0, 0.001), (5.0, 0.02))
    assert Faults(ack_delay_schedule=[(0, 0.001)]).ack_delay_schedule == ((0.0, 0.001),)


@pytest.mark.parametrize("text", ["", "1", "x@1", "1@x", "1@5,2@1", "1@1,2@1", "-1@0", "1@-1", "inf@0"])
def test_a_malformed_schedule_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="schedule"):
        AckDelaySchedule.parse(text)


@pytest.mark.parametrize("capacity", [-1, 1.5, True])
def test_a_capacity_is_a_whole_number(capacity: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        Faults(capacity=capacity)  # type: ignore[arg-type]


async def test_broker_serve_takes_a_capacity_and_a_schedule(tmp_path: Path) -> None:
    proc, url = start_broker(tmp_path, "--capacity", "2", "--ack-delay-schedule", "300@0")
    try:
        async with trio.open_nursery() as nursery:
            broker = WebSocketBroker(url, mesh_identity())
            await nursery.start(broker.run)
            answers = await _sends(broker, [message(f"m-{i}") for i in range(3)])
            assert [r.code for _, r in answers if not r.ok] == ["overloaded"]
            assert all(t >= 0.29 for t, r in answers if r.ok)
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_broker_serve_refuses_a_malformed_schedule_in_one_line_and_a_capacity_of_none() -> None:
    assert_clean_error(
        run("broker", "serve", "--open", "--port", "0", "--ack-delay-schedule", "soon"), 2, "schedule"
    )
    refused = run("broker", "serve", "--open", "--port", "0", "--capacity", "0")
    assert refused.returncode == 2 and "--capacity" in refused.stderr
