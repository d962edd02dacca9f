"""The native RFC 6455 codec: framing, the handshake, and what a peer may not do.

Checked against wsproto in both directions, so the two implementations
keep each other honest.
"""

from __future__ import annotations

import functools
import struct
import time

import pytest
import trio
import wsproto
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import AcceptConnection, BytesMessage, Message, Request, TextMessage

from trio_drain._ws import TransportClosed, open_connection, serve_websocket
from trio_drain._ws import _codec as wf
from trio_drain._ws import _handshake as hs

from . import wsconformance as wsc

MAX = 1 << 20


def client() -> wf.FrameCodec:
    return wf.FrameCodec(client=True, max_message_size=MAX)


def server(max_message_size: int = MAX) -> wf.FrameCodec:
    return wf.FrameCodec(client=False, max_message_size=max_message_size)


def in_pieces(codec: wf.FrameCodec, data: bytes, cuts: list[int]) -> list[wf.Event]:
    events: list[wf.Event] = []
    at = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        events += codec.receive(data[at:cut])
        at = cut
    return events


def raw_frame(first: int, payload: bytes, *, masked: bool, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    key = b"\x01\x02\x03\x04"
    head = (
        bytes((first, (0x80 if masked else 0) | n))
        if n < 126
        else struct.pack("!BBH", first, (0x80 if masked else 0) | 126, n)
    )
    return head + (key + wf.mask(payload, key) if masked else payload)


def wsproto_server() -> wsproto.WSConnection:
    """A wsproto server connection past its handshake."""
    ws_server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    ws_client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    ws_server.receive_data(ws_client.send(Request(host="h", target="/")))
    list(ws_server.events())
    ws_client.receive_data(ws_server.send(AcceptConnection()))
    return ws_server


def test_the_accept_key_is_the_rfcs_example() -> None:
    assert hs.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(st.binary(), st.binary(min_size=4, max_size=4))
def test_masking_twice_gives_the_data_back(data: bytes, key: bytes) -> None:
    assert wf.mask(wf.mask(data, key), key) == data
    assert wf.mask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))


@given(st.lists(st.text(max_size=300), min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
def test_messages_arrive_whole_however_the_bytes_are_cut(messages: list[str], cuts: list[int]) -> None:
    sender, receiver = client(), server()
    wire = b"".join(sender.text(m) for m in messages)
    assert in_pieces(receiver, wire, cuts) == [("message", m) for m in messages]


@given(st.text(max_size=40), st.sampled_from([126, 65_535, 65_536, 200_000]))
def test_long_messages_use_the_extended_lengths(text: str, length: int) -> None:
    message = (text or "x") * (length // len((text or "x").encode()) + 1)
    assert server().receive(client().text(message)) == [("message", message)]


@given(st.lists(st.text(max_size=50), min_size=2, max_size=5))
def test_wsproto_reads_what_we_send_and_we_read_its_fragments(parts: list[str]) -> None:
    # Our client's frames into a wsproto server.
    ws_server = wsproto_server()
    ws_server.receive_data(b"".join(client().text(p) for p in parts))
    assert [e.data for e in ws_server.events() if isinstance(e, Message)] == parts
    # A wsproto server's fragmented message into our client codec.
    wire = b"".join(
        ws_server.send(TextMessage(data=p, message_finished=i == len(parts) - 1)) for i, p in enumerate(parts)
    )
    assert client().receive(wire) == [("message", "".join(parts))]


def test_binary_messages_and_control_frames_are_events() -> None:
    wire = (
        wf.encode_frame(wf.OP_BINARY, b"\x00\xff", masked=True)
        + client().ping(b"p1")
        + client().pong(b"p2")
        + client().close(1001, "going away")
    )
    assert server().receive(wire) == [
        ("message", b"\x00\xff"),
        ("ping", b"p1"),
        ("pong", b"p2"),
        ("close", 1001, "going away"),
    ]
    assert server().receive(client().close(wf.CLOSE_NO_STATUS)) == [("close", wf.CLOSE_NO_STATUS, "")]


def test_control_frames_may_come_between_fragments() -> None:
    wire = (
        raw_frame(wf.OP_TEXT, b"he", masked=True)
        + raw_frame(0x80 | wf.OP_PING, b"x", masked=True)
        + raw_frame(0x80 | wf.OP_CONTINUATION, b"llo", masked=True)
    )
    assert server().receive(wire) == [("ping", b"x"), ("message", "hello")]


BROKEN = [
    ("reserved bits", raw_frame(0xC0 | wf.OP_TEXT, b"x", masked=True), 1002),
    ("unmasked client frame", raw_frame(0x80 | wf.OP_TEXT, b"x", masked=False), 1002),
    ("unknown opcode", raw_frame(0x80 | 0x3, b"x", masked=True), 1002),
    ("long control frame", raw_frame(0x80 | wf.OP_PING, b"x" * 126, masked=True), 1002),
    ("fragmented control frame", raw_frame(wf.OP_PING, b"x", masked=True), 1002),
    ("continuation first", raw_frame(0x80 | wf.OP_CONTINUATION, b"x", masked=True), 1002),
    (
        "new message mid-fragment",
        raw_frame(wf.OP_TEXT, b"a", masked=True) + raw_frame(0x80 | wf.OP_TEXT, b"b", masked=True),
        1002,
    ),
    ("text that is not UTF-8", raw_frame(0x80 | wf.OP_TEXT, b"\xff\xfe", masked=True), 1007),
    ("one-byte close code", raw_frame(0x80 | wf.OP_CLOSE, b"\x03", masked=True), 1002),
    (
        "close code 1005 on the wire",
        raw_frame(0x80 | wf.OP_CLOSE, struct.pack("!H", 1005), masked=True),
        1002,
    ),
    ("close code 999", raw_frame(0x80 | wf.OP_CLOSE, struct.pack("!H", 999), masked=True), 1002),
    (
        "close reason not UTF-8",
        raw_frame(0x80 | wf.OP_CLOSE, struct.pack("!H", 1000) + b"\xff", masked=True),
        1007,
    ),
]


@pytest.mark.parametrize(("wire", "code"), [(w, c) for _, w, c in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_a_peer_breaking_the_protocol_is_refused_with_the_right_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(wf.ProtocolError) as caught:
        server().receive(wire)
    assert caught.value.code == code


def test_a_masked_frame_from_a_server_is_refused() -> None:
    with pytest.raises(wf.ProtocolError):
        client().receive(raw_frame(0x80 | wf.OP_TEXT, b"x", masked=True))


def test_an_oversized_message_is_refused_from_its_header_before_its_body_arrives() -> None:
    header_only = raw_frame(0x80 | wf.OP_BINARY, b"", masked=True, length=1000)[:8]
    with pytest.raises(wf.ProtocolError) as caught:
        server(max_message_size=999).receive(header_only)
    assert caught.value.code == wf.CLOSE_TOO_BIG
    fragments = raw_frame(wf.OP_TEXT, b"a" * 600, masked=True) + raw_frame(0x80, b"a" * 600, masked=True)
    with pytest.raises(wf.ProtocolError):
        server(max_message_size=999).receive(fragments)


def test_the_server_answers_only_a_proper_upgrade() -> None:
    request, key = hs.client_request("h", "/ws")
    head, rest = hs.split_head(request + b"extra") or (b"", b"")
    assert rest == b"extra"
    answer = hs.server_response(head)
    response_head, _ = hs.split_head(answer) or (b"", b"")
    hs.check_response(response_head, key)  # our client accepts our server's answer
    cases = {
        b"POST /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade": b"400",
        b"GET /ws HTTP/1.1\r\nHost: h": b"426",
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8": b"426",
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: short": b"400",
        # RFC 6455 4.2.1 (and RFC 7230 5.4): no Host header is a 400, however good the rest.
        head.replace(b"Host: h\r\n", b""): b"400",
    }
    for bad, status in cases.items():
        with pytest.raises(hs.HandshakeFailed) as caught:
            hs.server_response(bad)
        assert caught.value.response.startswith(b"HTTP/1.1 " + status)


def test_the_client_refuses_a_wrong_or_missing_upgrade() -> None:
    _, key = hs.client_request("h", "/")
    with pytest.raises(hs.HandshakeFailed, match="rejected with HTTP 403"):
        hs.check_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0", key)
    with pytest.raises(hs.HandshakeFailed, match="does not match"):
        hs.check_response(
            b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: nope",
            key,
        )
    with pytest.raises(hs.HandshakeFailed, match="too long"):
        hs.split_head(b"x" * (hs.MAX_HEAD + 1))


async def test_frames_that_ride_in_with_the_handshake_are_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server whose first message shares a packet with its 101, and a client
    # whose first frame shares one with its request.
    async def eager_server(stream: trio.SocketStream) -> None:
        buffer = b""
        while hs.split_head(buffer) is None:
            buffer += await stream.receive_some(65536)
        head, rest = hs.split_head(buffer) or (b"", b"")
        assert server().receive(rest) == [("message", "early hello")]
        await stream.send_all(hs.server_response(head) + server().text("welcome"))
        await stream.receive_some(65536)  # until the client goes

    original = hs.client_request

    def request_with_a_frame(host: str, target: str) -> tuple[bytes, str]:
        request, key = original(host, target)
        return request + client().text("early hello"), key

    monkeypatch.setattr(hs, "client_request", request_with_a_frame)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, eager_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_connection(
            f"ws://127.0.0.1:{port}/",
            transport="native",
            ssl_context=None,
            max_message_size=MAX,
            connect_timeout=5,
        ) as ws:
            assert await ws.get_message() == "welcome"
        nursery.cancel_scope.cancel()


async def test_the_native_server_and_client_talk_and_close_cleanly() -> None:
    heard: list[str | bytes] = []

    async def echo(ws: object) -> None:
        connection = ws  # a ServerConnection
        for message in await connection.get_messages():  # type: ignore[attr-defined]
            heard.append(message)
            connection.send_message_nowait(f"echo {message}")  # type: ignore[attr-defined]
        await connection.aclose(4000, "done")  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_websocket(
                echo, "127.0.0.1", 0, max_message_size=MAX, task_status=task_status
            )
        )
        async with open_connection(
            f"ws://127.0.0.1:{port}/x",
            transport="native",
            ssl_context=None,
            max_message_size=MAX,
            connect_timeout=5,
        ) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "echo hi"
            with pytest.raises(TransportClosed, match="4000 done"):
                await ws.get_message()
        nursery.cancel_scope.cancel()
    assert heard == ["hi"]


def test_binary_payloads_from_wsproto_arrive_as_bytes() -> None:
    assert client().receive(wsproto_server().send(BytesMessage(data=b"\x00\x01"))) == [
        ("message", b"\x00\x01")
    ]


def test_a_long_close_reason_is_cut_on_a_character_boundary() -> None:
    # 123 bytes is all a close frame has room for; cutting "é" (2 bytes) in
    # half would make the reason invalid UTF-8 and the peer refuse it (1007).
    reason = "é" * 100
    [event] = server().receive(client().close(1000, reason))
    assert event[0] == "close" and event[1] == 1000
    received = event[2]
    assert isinstance(received, str) and reason.startswith(received) and len(received.encode()) <= 123


# -- issue 14: lengths in their shortest form, long frames in pieces, fail fast -------------------


def head(first: int, n: int, *, masked: bool, form: int) -> bytes:
    """A frame header with the length `n` in the `form` (7, 16 or 64 bits) given."""
    mask_bit = 0x80 if masked else 0
    if form == 7:
        return bytes((first, mask_bit | n))
    if form == 16:
        return struct.pack("!BBH", first, mask_bit | 126, n)
    return struct.pack("!BBQ", first, mask_bit | 127, n)


NOT_SHORTEST = [
    ("16-bit length for 5 bytes", 16, 5),
    ("16-bit length for 125 bytes", 16, 125),
    ("64-bit length for 5 bytes", 64, 5),
    ("64-bit length for 200 bytes", 64, 200),
    ("64-bit length for 65535 bytes", 64, 65535),
    ("64-bit length with its top bit set", 64, 1 << 63),
]


@pytest.mark.parametrize("is_client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize(
    ("form", "n"), [(f, n) for _, f, n in NOT_SHORTEST], ids=[i for i, _, _ in NOT_SHORTEST]
)
def test_a_length_not_in_its_shortest_form_is_a_protocol_error(is_client: bool, form: int, n: int) -> None:
    # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the
    # length"; a 64-bit length's most significant bit MUST be 0. Refused from
    # the header alone, on both ends, with 1002 (never 1009, however long).
    codec = client() if is_client else server()
    masked = not is_client  # what this end expects
    wire = (
        head(0x80 | wf.OP_BINARY, n, masked=masked, form=form)
        + b"\x01\x02\x03\x04" * masked
        + b"\x00" * min(n, 300)
    )
    with pytest.raises(wf.ProtocolError) as caught:
        codec.receive(wire)
    assert caught.value.code == wf.CLOSE_PROTOCOL_ERROR


def test_the_shortest_forms_at_their_edges_are_accepted() -> None:
    for n in (0, 125, 126, 65535, 65536):
        payload = b"\xfe" * n
        assert client().receive(wf.encode_frame(wf.OP_BINARY, payload, masked=False)) == [
            ("message", payload)
        ]
        assert server().receive(wf.encode_frame(wf.OP_BINARY, payload, masked=True)) == [("message", payload)]


def test_messages_parsed_before_a_bad_frame_are_handed_over_with_the_error() -> None:
    wire = client().text("first") + client().ping(b"p") + raw_frame(0xC0 | wf.OP_TEXT, b"x", masked=True)
    codec = server()
    with pytest.raises(wf.ProtocolError) as caught:
        codec.receive(wire)
    assert caught.value.code == wf.CLOSE_PROTOCOL_ERROR
    assert caught.value.events == [("message", "first"), ("ping", b"p")]
    with pytest.raises(wf.ProtocolError):  # and nothing more is parsed
        codec.receive(client().text("later"))


def test_nothing_after_a_close_frame_is_parsed() -> None:
    codec = server()
    wire = client().close(1000) + client().text("after") + b"\xff\xff garbage"
    assert codec.receive(wire) == [("close", 1000, "")]
    assert codec.receive(client().text("later")) == []


# The invalid sequence 0xF4 0x90 (past U+10FFFF) is refused at its second byte.
KOSME = wsc.KOSME


def test_bad_utf8_in_an_unfinished_fragmented_message_fails_at_that_fragment() -> None:
    codec = client()
    assert codec.receive(raw_frame(wf.OP_TEXT, KOSME, masked=False)) == []
    with pytest.raises(wf.ProtocolError) as caught:  # its last fragment has not come
        codec.receive(raw_frame(wf.OP_CONTINUATION, b"\xf4\x90", masked=False))
    assert caught.value.code == wf.CLOSE_INVALID_DATA


def test_bad_utf8_in_a_frame_arriving_in_pieces_fails_at_that_piece() -> None:
    text = KOSME + b"\xf4\x90\x80\x80edited"
    wire = wf.encode_frame(wf.OP_TEXT, text, masked=True)
    codec = server()
    assert codec.receive(wire[: 6 + len(KOSME) + 1]) == []  # the header, the valid part and 0xF4
    with pytest.raises(wf.ProtocolError) as caught:
        codec.receive(wire[6 + len(KOSME) + 1 : 6 + len(KOSME) + 2])  # 0x90
    assert caught.value.code == wf.CLOSE_INVALID_DATA


@pytest.mark.parametrize("valid_and_data", wsc.UTF8_SEQUENCES, ids=lambda v: v[1].hex()[:24])
def test_autobahns_utf8_sequences_whole_fragmented_and_in_pieces(valid_and_data: tuple[bool, bytes]) -> None:
    valid, data = valid_and_data
    assert valid == wsc.is_utf8(data)  # the table agrees with Python's strict decoder
    whole = wf.encode_frame(wf.OP_TEXT, data, masked=True)
    octet_fragments = b"".join(
        wsc.Frame(op, data[i : i + 1], fin=i == len(data) - 1).wire(masked=True)
        for i, op in enumerate([wf.OP_TEXT] + [wf.OP_CONTINUATION] * (len(data) - 1))
    )
    for wire, step in ((whole, len(whole)), (octet_fragments, len(octet_fragments)), (whole, 1)):
        codec = server()
        if valid:
            assert in_pieces(codec, wire, list(range(step, len(wire), step))) == [("message", data.decode())]
        else:
            with pytest.raises(wf.ProtocolError) as caught:
                in_pieces(codec, wire, list(range(step, len(wire), step)))
            assert caught.value.code == wf.CLOSE_INVALID_DATA


@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=3000), st.booleans()), min_size=1, max_size=4),
    st.lists(st.integers(0, 15_000), max_size=12),
    st.booleans(),
)
def test_messages_of_any_kind_arrive_whole_however_the_bytes_are_cut(
    messages: list[tuple[bool, bytes, bool]],
    cuts: list[int],
    from_client: bool,
) -> None:
    # Text and binary, masked or not, fragmented or not: the same messages
    # whatever the cuts (a frame cut anywhere is taken in pieces).
    expected: list[wf.Event] = []
    wire = b""
    for is_text, data, fragmented in messages:
        payload = data.decode("utf-8", "replace").encode() if is_text else data
        opcode = wf.OP_TEXT if is_text else wf.OP_BINARY
        half = len(payload) // 2 if fragmented else len(payload)
        wire += wsc.Frame(opcode, payload[:half], fin=not fragmented).wire(masked=from_client)
        if fragmented:
            wire += wsc.Frame(wf.OP_CONTINUATION, payload[half:]).wire(masked=from_client)
        expected.append(("message", payload.decode() if is_text else payload))
    receiver = server() if from_client else client()
    assert in_pieces(receiver, wire, cuts) == expected


def test_a_long_frame_in_small_pieces_takes_time_linear_in_its_length() -> None:
    # Regression: every piece used to be joined to all the frame's bytes so
    # far (a 4 MiB frame in 1,460-byte TCP segments took 7x as long as in
    # 64 KiB reads). Pieces are now taken as they come.
    def feed(size: int) -> float:
        data = wf.encode_frame(wf.OP_BINARY, b"\xfe" * size, masked=False)
        best = float("inf")
        for _ in range(3):
            codec = wf.FrameCodec(client=True, max_message_size=size)
            start = time.perf_counter()
            for at in range(0, len(data), 1460):
                events = codec.receive(data[at : at + 1460])
                assert len(codec._buffer) < 14  # never more than a header held back
            best = min(best, time.perf_counter() - start)
            assert events == [("message", b"\xfe" * size)]
        return best

    small, large = feed(1024 * 1024), feed(4 * 1024 * 1024)
    assert large < 8 * small  # linear: about 4 (quadratic would be about 16)
