"""RFC 6455 conformance of both ends, on loopback, against a scripted raw-socket peer.

The cases (tests/wsconformance.py) are modelled on the Autobahn test suite's
sections 1 to 9. Each runs against (a) the client, our native transport's
`open_connection`, facing a scripted server, and (b) the reference broker's
server side, facing a scripted client that has said a valid hello. Each
checks what RFC 6455 asks of the end under test: the messages it delivers
(the client's user receives them; the broker acks its `send` frames), the
pongs it sends, and the close code it closes with. Then the opening
handshake, the closing handshake on cancellation, and how pongs answer
pings.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_drain import MeshIdentity, WebSocketBroker, generate_secret_key, serve_broker
from trio_drain._clock import wall_clock_ms
from trio_drain._ws import Connection, TransportClosed, TransportRejected, _engine, open_connection

from .wsconformance import (
    CASES,
    CLOSE,
    LIMIT,
    PING,
    PONG,
    Case,
    Frame,
    FrameReader,
    Outcome,
    Pause,
    Peer,
    accept_for,
    accept_upgrade,
    acked_ids,
    close_frame,
    read_head,
    send_ids,
    upgrade_request,
)

IDENTITY = MeshIdentity(mesh_id="mesh-conformance", member_id="member-1", secret_key=generate_secret_key())


def check(case: Case, outcome: Outcome) -> None:
    """What every case asks of either end."""
    assert outcome.close_code == case.close, f"closed with {outcome.closes!r}"
    assert outcome.pongs == list(case.pongs)
    assert outcome.after_close == [], "frames sent after the close frame"
    if case.fail_fast:
        pauses = sum(isinstance(step, Pause) and step.seconds > 0 for step in case.steps)
        assert outcome.cut_short == pauses - 1, "failed too late (or too early)"


def has_close(case: Case) -> bool:
    return any(isinstance(step, Frame) and step.opcode == CLOSE for step in case.steps)


# -- (a) the client -----------------------------------------------------------------------------


@asynccontextmanager
async def scripted_server(handler: Any) -> AsyncIterator[str]:
    """Serve `handler(stream)` on a free loopback port; yield its ws:// URL."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        nursery.cancel_scope.cancel()


def connect(url: str, **kw: Any) -> Any:
    return open_connection(
        url,
        transport="native",
        ssl_context=None,
        max_message_size=kw.pop("limit", LIMIT),
        connect_timeout=5,
        **kw,
    )


async def read_all(ws: Connection) -> tuple[list[str | bytes], str]:
    """Every message the connection delivers, and why it closed."""
    delivered: list[str | bytes] = []
    while True:
        try:
            delivered += await ws.get_messages()
        except TransportClosed as exc:
            return delivered, str(exc)


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_the_client(case: Case) -> None:
    outcomes: list[Outcome] = []
    played = trio.Event()

    async def play(stream: trio.SocketStream) -> None:
        rest = await accept_upgrade(stream)
        outcomes.append(await Peer(stream, client=False, received=rest).play(case))
        played.set()

    with trio.fail_after(15):
        async with scripted_server(play) as url:
            async with connect(url) as ws:
                delivered, reason = await read_all(ws)
            await played.wait()
    check(case, outcomes[0])
    assert delivered == list(case.messages)
    if case.fails:
        assert "protocol error" in reason


# -- (b) the reference broker's server side ----------------------------------------------------


async def open_broker_socket(nursery: trio.Nursery) -> tuple[trio.SocketStream, bytes]:
    """A raw socket to a fresh reference broker, upgraded; the bytes after the 101."""
    server = await nursery.start(functools.partial(serve_broker, open_mode=True))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    request, key = upgrade_request()
    await stream.send_all(request)
    head, rest = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {accept_for(key)}".encode() in head
    return stream, rest


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_the_reference_broker(case: Case) -> None:
    expected = send_ids(case.messages)
    # Sends that arrive with (or before) a close or a failure are not
    # answered: the connection is closed by then.
    settled = not case.fails and not has_close(case)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            stream, rest = await open_broker_socket(nursery)
            peer = Peer(stream, client=True, received=rest)
            assert (
                json.loads(await peer.hello(json.dumps(IDENTITY.hello(wall_clock_ms()))))["type"]
                == "hello_ack"
            )
            outcome = await peer.play(case, until=lambda o: expected <= acked_ids(o.texts))
            nursery.cancel_scope.cancel()
    check(case, outcome)
    acked = acked_ids(outcome.texts)
    assert acked == expected if settled else acked <= expected
    assert outcome.eof, "the server did not close TCP"


# -- the opening handshake ----------------------------------------------------------------------


HANDSHAKES = [
    ("no Host header (RFC 6455 4.2.1)", {"host": False}, b"400"),
    ("POST", {"method": "POST"}, b"400"),
    ("no Upgrade", {"upgrade": False}, b"426"),
    ("version 8", {"version": "8"}, b"426"),
    ("a key that is not 16 bytes", {"key": "c2hvcnQ="}, b"400"),
]


@pytest.mark.parametrize(
    ("request_kw", "status"), [(kw, s) for _, kw, s in HANDSHAKES], ids=[n for n, _, _ in HANDSHAKES]
)
async def test_the_reference_broker_refuses_a_bad_upgrade(request_kw: dict[str, Any], status: bytes) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve_broker, open_mode=True))
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(upgrade_request(**request_kw)[0])
                head, _ = await read_head(stream)
                assert head.startswith(b"HTTP/1.1 " + status)
                if status == b"426":
                    assert b"Sec-WebSocket-Version: 13" in head
                assert await stream.receive_some(100) == b""  # and it hangs up
            nursery.cancel_scope.cancel()


ANSWERS = [
    ("refused", lambda key: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0", "HTTP 403"),
    (
        "wrong accept",
        lambda key: (
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_for("x").encode()
        ),
        "does not match",
    ),
    (
        "no upgrade",
        lambda key: b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: " + accept_for(key).encode(),
        "did not upgrade",
    ),
    (
        "an extension we did not offer",
        lambda key: (
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade"
            b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Accept: "
            + accept_for(key).encode()
        ),
        "extension",
    ),
]


@pytest.mark.parametrize(
    ("answer", "complaint"), [(a, c) for _, a, c in ANSWERS], ids=[n for n, _, _ in ANSWERS]
)
async def test_the_client_refuses_a_bad_answer(answer: Any, complaint: str) -> None:
    async def answer_badly(stream: trio.SocketStream) -> None:
        head, _ = await read_head(stream)
        key = next(
            line.split(": ")[1]
            for line in head.decode().split("\r\n")
            if line.startswith("Sec-WebSocket-Key")
        )
        await stream.send_all(answer(key) + b"\r\n\r\n")
        await stream.receive_some(100)

    with trio.fail_after(5):
        async with scripted_server(answer_badly) as url:
            with pytest.raises(TransportRejected, match=complaint):
                async with connect(url):
                    pass


# -- the closing handshake, on cancellation too -------------------------------------------------


class ClosingServer:
    """Upgrades, answers a hello with hello_ack, then records the client's
    close frame and answers it `delay` seconds later (or never)."""

    def __init__(self, delay: float | None = 0.2) -> None:
        self.delay = delay
        self.closes: list[bytes] = []
        self.close_received = trio.Event()
        self.answered_at: float | None = None
        self.eof_at: float | None = None
        self.done = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(masked=True)
        data = await accept_upgrade(stream)
        try:
            while True:
                for _, opcode, payload in reader.feed(data):
                    if opcode == CLOSE:
                        self.closes.append(payload)
                        self.close_received.set()
                        if self.delay is not None:
                            await trio.sleep(self.delay)
                            await stream.send_all(close_frame(1000).wire(masked=False))
                            self.answered_at = trio.current_time()
                    elif not self.closes and opcode == 0x1 and b'"hello"' in payload:
                        await stream.send_all(
                            Frame(0x1, b'{"type":"hello_ack","presenceId":"p"}').wire(masked=False)
                        )
                data = await stream.receive_some(65536)
                if not data:
                    break
            self.eof_at = trio.current_time()
        finally:
            await stream.aclose()
            self.done.set()


async def test_a_cancelled_client_sends_close_and_waits_for_the_servers_close() -> None:
    server = ClosingServer(delay=0.2)
    with trio.fail_after(5):
        async with scripted_server(server) as url:
            with trio.CancelScope() as scope:
                async with connect(url):
                    scope.cancel()
                    await trio.sleep_forever()
            left = trio.current_time()
            await server.done.wait()
    assert server.closes and server.closes[0][:2] == b"\x03\xe8"  # 1000, before TCP went
    assert server.answered_at is not None and left >= server.answered_at  # it waited for our close


async def test_a_cancelled_broker_run_completes_the_closing_handshake() -> None:
    server = ClosingServer(delay=0.1)
    with trio.fail_after(5):
        async with scripted_server(server) as url:
            async with trio.open_nursery() as nursery:
                broker = WebSocketBroker(url, IDENTITY, reconnect_backoff=(5.0,))
                await nursery.start(broker.run)
                assert broker.is_open()
                nursery.cancel_scope.cancel()
            await server.done.wait()
    assert server.closes and server.closes[0][:2] == b"\x03\xe8"
    assert (
        server.answered_at is not None and server.eof_at is not None and server.eof_at >= server.answered_at
    )


async def test_the_closing_handshake_is_bounded_when_the_peer_never_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_engine, "CLOSE_TIMEOUT", 0.3)
    server = ClosingServer(delay=None)
    with trio.fail_after(2):
        async with scripted_server(server) as url:
            with trio.CancelScope() as scope:
                async with connect(url):
                    start = trio.current_time()
                    scope.cancel()
                    await trio.sleep_forever()
            assert server.closes
            await server.done.wait()
    assert 0.25 <= trio.current_time() - start < 1.0  # it waited for an answer, but not for ever


# -- pings and pongs ----------------------------------------------------------------------------


async def test_only_a_pong_echoing_our_ping_answers_it() -> None:
    # RFC 6455 5.5.3: an unsolicited pong (a heartbeat) answers nothing.
    pinged = trio.Event()
    payloads: list[bytes] = []
    send_to_client, to_client = trio.open_memory_channel[bytes](10)

    async def server(stream: trio.SocketStream) -> None:
        reader = FrameReader(masked=True)
        data = await accept_upgrade(stream)

        async def write() -> None:
            async for frame in to_client:
                await stream.send_all(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            while True:
                for _, opcode, payload in reader.feed(data):
                    if opcode == PING:
                        payloads.append(payload)
                        pinged.set()
                data = await stream.receive_some(65536)
                if not data:
                    break
            nursery.cancel_scope.cancel()

    with trio.fail_after(5):
        async with scripted_server(server) as url, connect(url) as ws, trio.open_nursery() as nursery:
            answered = trio.Event()

            async def ping() -> None:
                await ws.ping()
                answered.set()

            nursery.start_soon(ping)
            await pinged.wait()
            await send_to_client.send(Frame(PONG, b"heartbeat").wire(masked=False))
            await send_to_client.send(Frame(PONG, b"").wire(masked=False))
            await trio.sleep(0.1)
            assert not answered.is_set(), "an unsolicited pong answered our ping"
            await send_to_client.send(Frame(PONG, payloads[0]).wire(masked=False))
            await answered.wait()
