"""A scripted WebSocket peer and a table of cases modelled on the Autobahn test suite.

The peer speaks RFC 6455 from raw bytes (its own small frame writer and
reader, not the codec under test) over a Trio stream, so it can send what a
broken peer sends: reserved bits, unknown opcodes, lengths not in their
shortest form, fragmented control frames, bad UTF-8, bad close codes, and
any of it cut into pieces (one write, a write per frame, or a few octets at
a time). It records what the implementation under test sends back.

`CASES` follows Autobahn's numbering for sections 1 to 7 and 9 (framing,
ping/pong, reserved bits, opcodes, fragmentation, UTF-8, close handling,
limits); our own additions (shortest-form lengths, the message size limit)
are named for what they check. Each case says what the implementation must
do: the messages it delivers, the pongs it sends, and the close code it
closes with, RFC 6455's (1002 protocol error, 1007 invalid payload, 1009 too
big, an echo of the peer's code).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
import trio.lowlevel

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA

#: The longest message either end under test takes (WebSocketBroker's, and
#: the reference broker's with its default payload limit).
LIMIT = 4 * 1024 * 1024


# -- the wire, written and read independently of trio_drain -------------------------------------


@dataclass(frozen=True)
class Frame:
    """One frame as the peer sends it, faults and all.

    `length` claims a payload length other than the real one (to announce
    more than is sent); `form` forces the length's encoding: 7, 16 or 64
    bits, whatever the length (0: the shortest, as RFC 6455 requires).
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    length: int | None = None
    form: int = 0

    def wire(self, *, masked: bool) -> bytes:
        n = len(self.payload) if self.length is None else self.length
        form = self.form or (7 if n < 126 else 16 if n < 65536 else 64)
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        mask_bit = 0x80 if masked else 0
        if form == 7:
            head = bytes((first, mask_bit | n))
        elif form == 16:
            head = struct.pack("!BBH", first, mask_bit | 126, n)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, n)
        if not masked:
            return head + self.payload
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(self.payload))


def close_frame(code: int | None = 1000, reason: bytes = b"") -> Frame:
    return Frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def fragments(opcode: int, payload: bytes, size: int) -> list[Frame]:
    """`payload` as one message in frames of `size` bytes (the last may be shorter)."""
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [
        Frame(opcode if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1)
        for i, piece in enumerate(pieces)
    ]


def send_json(ident: str, size: int = 0, pad: str = "x") -> str:
    """A `send` frame (the reference broker acks it by `ident`), padded with
    `pad` to `size` bytes of UTF-8 when that is more than its bare size."""
    bare = json.dumps({"type": "send", "id": ident, "pad": ""}, ensure_ascii=False)
    missing = max(0, size - len(bare.encode()))
    unit = len(pad.encode())
    text = pad * (missing // unit) + "x" * (missing % unit)
    return json.dumps({"type": "send", "id": ident, "pad": text}, ensure_ascii=False)


class FrameReader:
    """Parses what the implementation under test sends (no checks beyond need)."""

    def __init__(self, *, masked: bool) -> None:
        self.masked = masked
        self.buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[bool, int, bytes]]:
        """(fin, opcode, payload) of each frame `data` completes."""
        self.buffer += data
        frames = []
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            n, at = second & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    break
                n, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    break
                n, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            key = b""
            if second & 0x80:
                key, at = bytes(self.buffer[at : at + 4]), at + 4
            if len(self.buffer) < at + n:
                break
            payload = bytes(self.buffer[at : at + n])
            if key:
                payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            assert bool(key) == self.masked, "the implementation masked the wrong way round"
            del self.buffer[: at + n]
            frames.append((bool(first & 0x80), first & 0x0F, payload))
        return frames


# -- the opening handshake, as the peer does it --------------------------------------------------


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """(head, what came after it) of an HTTP request or response."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"the connection closed during the handshake: {buffer!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


async def accept_upgrade(stream: trio.abc.Stream) -> bytes:
    """Answer a client's upgrade request with a 101; the bytes after the request."""
    head, rest = await read_head(stream)
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    key = {k.lower(): v for k, v in headers.items()}["sec-websocket-key"]
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key).encode() + b"\r\n\r\n"
    )
    return rest


def upgrade_request(
    *,
    host: bool = True,
    version: str = "13",
    key: str | None = None,
    method: str = "GET",
    upgrade: bool = True,
) -> tuple[bytes, str]:
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    lines = [f"{method} /ws HTTP/1.1"]
    if host:
        lines.append("Host: 127.0.0.1")
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    lines += [f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


# -- a case, and the peer playing it ------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """Wait this long before the next step, or less: no longer than it takes
    the implementation to close (what comes after a pause is then not sent)."""

    seconds: float


Step = Frame | Pause


@dataclass(frozen=True)
class Case:
    """What the peer sends, and what the implementation under test must do.

    Args:
        steps: frames and pauses, in order.
        chop: how the frames go out between pauses: None, all in one write;
            0, a write per frame; n, writes of n bytes.
        messages: what the implementation's user receives (client side), or,
            of them, the reference broker's `send` frames that it must ack
            (server side).
        pongs: the payloads of the pongs it must send, in order.
        close: the close code it must send: its own when it fails the
            connection (`fails`), else its answer to the peer's close frame
            (None: a close frame with no code). The peer closes with code
            1000 after the steps, unless a step is a close frame.
        fails: the implementation fails the connection (it closes first).
        fail_fast: it must fail during the last pause: after the offending
            bytes went out, before the rest did (and not before them).
    """

    ident: str
    steps: tuple[Step, ...]
    chop: int | None = None
    messages: tuple[str | bytes, ...] = ()
    pongs: tuple[bytes, ...] = ()
    close: int | None = 1000
    fails: bool = False
    fail_fast: bool = False

    def __str__(self) -> str:
        return self.ident


@dataclass
class Outcome:
    """What the implementation under test did."""

    texts: list[str] = field(default_factory=list)  # text messages it sent
    pongs: list[bytes] = field(default_factory=list)
    closes: list[bytes] = field(default_factory=list)  # close frame payloads
    after_close: list[int] = field(default_factory=list)  # opcodes of frames it sent after its close
    eof: bool = False  # it closed TCP (or reset it) after its close frame
    cut_short: int | None = None  # which pause (counting from 0) its close cut short; the rest was not sent
    close_seen: trio.Event = field(default_factory=trio.Event)

    @property
    def close_code(self) -> int | None:
        assert len(self.closes) == 1, f"expected one close frame, got {self.closes!r}"
        payload = self.closes[0]
        return struct.unpack("!H", payload[:2])[0] if payload else None


class Peer:
    """Plays a case's steps over `stream`, as the server (unmasked frames)
    or the client (masked), and records the other end's answers."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool, received: bytes = b"") -> None:
        self.stream = stream
        self.client = client
        self.reader = FrameReader(masked=not client)
        self.outcome = Outcome()
        self.received: bytes | bytearray = received
        self.closed_by_us = False  # we sent a close frame
        self.eof = trio.Event()
        self.progress = trio.Event()  # set whenever a frame arrives

    async def send(self, data: bytes) -> bool:
        """False if the other end has gone (our write failed)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def play(self, case: Case, *, until: Callable[[Outcome], bool] | None = None) -> Outcome:
        """The case's steps, then the closing handshake, within 10 s.

        Unless a step closed, the peer closes with code 1000 once `until`
        (given what the other end sent so far) is true.
        """
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                await self._steps(case.steps, case.chop)
                while until is not None and not until(self.outcome) and not self.outcome.close_seen.is_set():
                    await self.progress.wait()
                    self.progress = trio.Event()
                if not self.closed_by_us and not case.fails:
                    self.closed_by_us = True
                    await self.send(close_frame(1000).wire(masked=self.client))
                await self.outcome.close_seen.wait()
                if not self.closed_by_us and self.outcome.closes:  # answer its close, as RFC 6455 asks
                    self.closed_by_us = True
                    payload = self.outcome.closes[0]
                    echo = close_frame(struct.unpack("!H", payload[:2])[0] if payload else None)
                    await self.send(echo.wire(masked=self.client))
                if self.client:  # the server closes TCP first
                    await self.eof.wait()
                await self.stream.aclose()
                nursery.cancel_scope.cancel()
        return self.outcome

    async def _steps(self, steps: Sequence[Step], chop: int | None) -> None:
        batch: list[bytes] = []
        pauses = 0
        for step in [*steps, Pause(0)]:
            if isinstance(step, Frame):
                if step.opcode == CLOSE:
                    self.closed_by_us = True
                batch.append(step.wire(masked=self.client))
                continue
            writes = (
                [b"".join(batch)]
                if chop is None
                else batch
                if chop == 0
                else [w[i : i + chop] for w in batch for i in range(0, len(w), chop)]
            )
            batch = []
            for data in writes:
                if data and not await self.send(data):
                    return
                if chop:
                    await trio.lowlevel.checkpoint()  # let the other end read each piece on its own
            if step.seconds:
                with trio.move_on_after(step.seconds):
                    await self.outcome.close_seen.wait()
                if self.outcome.close_seen.is_set():
                    self.outcome.cut_short = pauses
                    return
                pauses += 1

    async def hello(self, text: str) -> str:
        """Send a text frame and return the first text frame that answers it."""
        await self.stream.send_all(Frame(TEXT, text.encode()).wire(masked=self.client))
        while True:
            frames, self.received = self.reader.feed(self.received), b""
            for _, opcode, payload in frames:
                if opcode == TEXT:
                    return payload.decode()
            self.received = await self.stream.receive_some(65536)
            if not self.received:
                raise EOFError("the connection closed before the hello was answered")

    async def _read(self) -> None:
        outcome = self.outcome
        data: bytes | bytearray = self.received
        while True:
            for _, opcode, payload in self.reader.feed(data):
                self.progress.set()
                if outcome.closes:
                    outcome.after_close.append(opcode)
                elif opcode == CLOSE:
                    outcome.closes.append(payload)
                    outcome.close_seen.set()
                elif opcode == PONG:
                    outcome.pongs.append(payload)
                elif opcode == TEXT:
                    outcome.texts.append(payload.decode())
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                outcome.eof = True
                self.eof.set()
                self.progress.set()
                outcome.close_seen.set()  # (a close that never came is reported by the checks)
                return


def acked_ids(texts: Sequence[str]) -> set[str]:
    """The ids of the reference broker's acks among the text frames it sent."""
    ids = set()
    for text in texts:
        frame = json.loads(text)
        if frame.get("type") == "ack":
            ids.add(str(frame.get("id")))
    return ids


def send_ids(messages: Sequence[str | bytes]) -> set[str]:
    """The ids of the `send` frames among a case's messages."""
    ids = set()
    for message in messages:
        if isinstance(message, str) and message.startswith('{"type": "send"'):
            ids.add(str(json.loads(message)["id"]))
    return ids


# -- the cases ----------------------------------------------------------------------------------


def _t(text: str | bytes, **kw: object) -> Frame:
    return Frame(TEXT, text.encode() if isinstance(text, str) else text, **kw)  # type: ignore[arg-type]


def _case(ident: str, *steps: Step, **kw: object) -> Case:
    return Case(ident, tuple(steps), **kw)  # type: ignore[arg-type]


HELLO = "Hello, world!"
KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"  # "κόσμε" as Autobahn spells it (11 bytes)
FAIL_1002: dict[str, object] = {"fails": True, "close": 1002}
FAIL_1007: dict[str, object] = {"fails": True, "close": 1007}
FAIL_1009: dict[str, object] = {"fails": True, "close": 1009}


def _framing() -> list[Case]:
    """Section 1: text and binary messages of the lengths at each encoding's edges."""
    cases = []
    for n, size in enumerate([0, 125, 126, 127, 128, 65535, 65536], 1):
        text = send_json(f"1.1.{n}", size) if size else ""
        cases.append(_case(f"1.1.{n}", _t(text), messages=(text,)))
        data = b"\xfe" * size
        cases.append(_case(f"1.2.{n}", Frame(BINARY, data), messages=(data,)))
    text = send_json("1.1.8", 65536)
    cases.append(_case("1.1.8", _t(text), chop=997, messages=(text,)))
    cases.append(_case("1.2.8", Frame(BINARY, b"\xfe" * 65536), chop=997, messages=(b"\xfe" * 65536,)))
    # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length".
    cases += [
        _case("length 16-bit for 5 bytes", _t("hello", form=16), **FAIL_1002),
        _case("length 64-bit for 5 bytes", _t("hello", form=64), **FAIL_1002),
        _case("length 64-bit for 200 bytes", Frame(BINARY, b"b" * 200, form=64), **FAIL_1002),
        _case("length 64-bit for 65535 bytes", Frame(BINARY, b"b" * 65535, form=64), **FAIL_1002),
        _case("length 64-bit top bit set", Frame(BINARY, b"b" * 10, length=1 << 63), **FAIL_1002),
        _case("length 16-bit for a ping", Frame(PING, b"p", form=16), **FAIL_1002),
        _case(
            "message then length 16-bit for 5 bytes",
            _t(HELLO),
            _t("hello", form=16),
            messages=(HELLO,),
            **FAIL_1002,
        ),
    ]
    return cases


def _ping_pong() -> list[Case]:
    """Section 2."""
    binary = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
    pings = [f"payload-{i}".encode() for i in range(10)]
    return [
        _case("2.1", Frame(PING), pongs=(b"",)),
        _case("2.2", Frame(PING, HELLO.encode()), pongs=(HELLO.encode(),)),
        _case("2.3", Frame(PING, binary), pongs=(binary,)),
        _case("2.4", Frame(PING, b"\xfe" * 125), pongs=(b"\xfe" * 125,)),
        _case("2.5", Frame(PING, b"\xfe" * 126), **FAIL_1002),
        _case("2.6", Frame(PING, b"\xfe" * 125), chop=1, pongs=(b"\xfe" * 125,)),
        _case("2.7", Frame(PONG)),
        _case("2.8", Frame(PONG, b"unsolicited pong payload")),
        _case(
            "2.9",
            Frame(PONG, b"unsolicited pong payload"),
            Frame(PING, b"ping payload"),
            pongs=(b"ping payload",),
        ),
        _case("2.10", *[Frame(PING, p) for p in pings], pongs=tuple(pings)),
        _case("2.11", *[Frame(PING, p) for p in pings], chop=1, pongs=tuple(pings)),
    ]


def _reserved_bits() -> list[Case]:
    """Section 3: no extension was negotiated, so every reserved bit is an error."""
    first = send_json("3.x")
    return [
        _case("3.1", _t(HELLO, rsv=1), **FAIL_1002),
        _case("3.2", _t(first), _t(HELLO, rsv=2), Frame(PING), messages=(first,), **FAIL_1002),
        _case("3.3", _t(first), _t(HELLO, rsv=3), Frame(PING), chop=0, messages=(first,), **FAIL_1002),
        _case("3.4", _t(first), _t(HELLO, rsv=4), Frame(PING), chop=1, messages=(first,), **FAIL_1002),
        _case("3.5", Frame(BINARY, b"\x00\xff\xfe\xfd", rsv=5), **FAIL_1002),
        _case("3.6", Frame(PING, HELLO.encode(), rsv=6), **FAIL_1002),
        _case("3.7", Frame(CLOSE, struct.pack("!H", 1000), rsv=7), **FAIL_1002),
    ]


def _opcodes() -> list[Case]:
    """Section 4: reserved opcodes, data (3 to 7) and control (11 to 15)."""
    first = send_json("4.x")
    cases = []
    for group, base in ((1, 3), (2, 11)):
        cases += [
            _case(f"4.{group}.1", Frame(base), **FAIL_1002),
            _case(f"4.{group}.2", Frame(base + 1, b"reserved opcode payload"), **FAIL_1002),
            _case(f"4.{group}.3", _t(first), Frame(base + 2), Frame(PING), messages=(first,), **FAIL_1002),
            _case(
                f"4.{group}.4",
                _t(first),
                Frame(base + 3, b"payload"),
                Frame(PING),
                messages=(first,),
                **FAIL_1002,
            ),
            _case(
                f"4.{group}.5",
                _t(first),
                Frame(base + 4, b"payload"),
                Frame(PING),
                chop=1,
                messages=(first,),
                **FAIL_1002,
            ),
        ]
    return cases


def _fragmentation() -> list[Case]:
    """Section 5."""
    whole = send_json("5.x", 40)
    one, two = whole[:17].encode(), whole[17:].encode()
    parts = [f"fragment{i}".encode() for i in range(1, 6)]
    nothing_to_continue = Frame(CONTINUATION, b"non-continuation payload")
    cases = [
        _case("5.1", Frame(PING, b"fragment1", fin=False), Frame(CONTINUATION, b"fragment2"), **FAIL_1002),
        _case("5.2", Frame(PONG, b"fragment1", fin=False), Frame(CONTINUATION, b"fragment2"), **FAIL_1002),
    ]
    for ident, chop in (("5.3", None), ("5.4", 0), ("5.5", 1)):
        cases.append(_case(ident, _t(one, fin=False), Frame(CONTINUATION, two), chop=chop, messages=(whole,)))
    for ident, chop in (("5.6", None), ("5.7", 0), ("5.8", 1)):
        cases.append(
            _case(
                ident,
                _t(one, fin=False),
                Frame(PING, b"ping payload"),
                Frame(CONTINUATION, two),
                chop=chop,
                pongs=(b"ping payload",),
                messages=(whole,),
            )
        )
    for ident, chop in (("5.9", None), ("5.10", 0), ("5.11", 1)):
        cases.append(_case(ident, nothing_to_continue, _t(HELLO), chop=chop, **FAIL_1002))
    for ident, chop in (("5.12", None), ("5.13", 0), ("5.14", 1)):
        cases.append(
            _case(
                ident,
                Frame(CONTINUATION, b"non-continuation payload", fin=False),
                _t(HELLO),
                chop=chop,
                **FAIL_1002,
            )
        )
    cases += [
        _case(
            "5.15",
            _t(one, fin=False),
            Frame(CONTINUATION, two),
            Frame(CONTINUATION, b"fragment3", fin=False),
            _t(b"fragment4"),
            messages=(whole,),
            **FAIL_1002,
        ),
        _case(
            "5.16",
            *[
                Frame(CONTINUATION, b"fragment1", fin=False),
                _t(b"fragment2", fin=False),
                Frame(CONTINUATION, b"fragment3"),
            ]
            * 2,
            **FAIL_1002,
        ),
        _case(
            "5.17",
            *[
                Frame(CONTINUATION, b"fragment1"),
                _t(b"fragment2", fin=False),
                Frame(CONTINUATION, b"fragment3"),
            ]
            * 2,
            **FAIL_1002,
        ),
        _case("5.18", _t(b"fragment1", fin=False), _t(b"fragment2"), **FAIL_1002),
    ]
    for ident, chop in (("5.19", None), ("5.20", 0)):
        cases.append(
            _case(
                ident,
                _t(parts[0], fin=False),
                Frame(CONTINUATION, parts[1], fin=False),
                Frame(PING, b"pongme 1!"),
                Pause(0.1),
                Frame(CONTINUATION, parts[2], fin=False),
                Frame(CONTINUATION, parts[3], fin=False),
                Frame(PING, b"pongme 2!"),
                Frame(CONTINUATION, parts[4]),
                chop=chop,
                pongs=(b"pongme 1!", b"pongme 2!"),
                messages=(b"".join(parts).decode(),),
            )
        )
    return cases


#: Autobahn's UTF-8 sequences (from Markus Kuhn's UTF-8 decoder test): (valid, bytes).
UTF8_SEQUENCES: list[tuple[bool, bytes]] = [
    (True, b"hello$world"),
    (True, b"hello\xc2\xa2world"),
    (True, b"hello\xe2\x82\xacworld"),
    (True, b"hello\xf0\xa4\xad\xa2world"),
    (True, KOSME),
    *[(True, b"\x00"), (True, b"\xc2\x80"), (True, b"\xe0\xa0\x80"), (True, b"\xf0\x90\x80\x80")],
    *[(False, b"\xf8\x88\x80\x80\x80"), (False, b"\xfc\x84\x80\x80\x80\x80")],
    *[(True, b"\x7f"), (True, b"\xdf\xbf"), (True, b"\xef\xbf\xbf"), (True, b"\xf4\x8f\xbf\xbf")],
    *[(False, b"\xf7\xbf\xbf\xbf"), (False, b"\xfb\xbf\xbf\xbf\xbf"), (False, b"\xfd\xbf\xbf\xbf\xbf\xbf")],
    *[
        (True, b"\xed\x9f\xbf"),
        (True, b"\xee\x80\x80"),
        (True, b"\xef\xbf\xbd"),
        (False, b"\xf4\x90\x80\x80"),
    ],
    *[
        (False, s)
        for s in (
            b"\x80",
            b"\xbf",
            b"\x80\xbf",
            b"\x80\xbf\x80",
            b"\x80\xbf\x80\xbf",
            bytes(range(0x80, 0xBF)),
        )
    ],
    *[
        (False, b"".join(bytes((c, 0x20)) for c in range(lo, hi)))
        for lo, hi in ((0xC0, 0xDF), (0xE0, 0xEF), (0xF0, 0xF7), (0xF8, 0xFB), (0xFC, 0xFD))
    ],
    *[
        (False, s)
        for s in (
            b"\xc0",
            b"\xe0\x80",
            b"\xf0\x80\x80",
            b"\xf8\x80\x80\x80",
            b"\xfc\x80\x80\x80\x80",
            b"\xdf",
            b"\xef\xbf",
            b"\xf7\xbf\xbf",
            b"\xfb\xbf\xbf\xbf",
            b"\xfd\xbf\xbf\xbf\xbf",
        )
    ],
    (False, b"\xc0\xe0\x80\xf0\x80\x80\xf8\x80\x80\x80\xfc\x80\x80\x80\x80\xdf\xef\xbf\xf7\xbf\xbf"),
    *[(False, s) for s in (b"\xfe", b"\xff", b"\xfe\xfe\xff\xff")],
    *[
        (False, s)
        for s in (
            b"\xc0\xaf",
            b"\xe0\x80\xaf",
            b"\xf0\x80\x80\xaf",
            b"\xf8\x80\x80\x80\xaf",
            b"\xfc\x80\x80\x80\x80\xaf",
        )
    ],
    *[
        (False, s)
        for s in (
            b"\xc1\xbf",
            b"\xe0\x9f\xbf",
            b"\xf0\x8f\xbf\xbf",
            b"\xf8\x87\xbf\xbf\xbf",
            b"\xfc\x83\xbf\xbf\xbf\xbf",
        )
    ],
    *[
        (False, s)
        for s in (
            b"\xc0\x80",
            b"\xe0\x80\x80",
            b"\xf0\x80\x80\x80",
            b"\xf8\x80\x80\x80\x80",
            b"\xfc\x80\x80\x80\x80\x80",
        )
    ],
    *[
        (False, s)
        for s in (
            b"\xed\xa0\x80",
            b"\xed\xad\xbf",
            b"\xed\xae\x80",
            b"\xed\xaf\xbf",
            b"\xed\xb0\x80",
            b"\xed\xbe\x80",
            b"\xed\xbf\xbf",
        )
    ],
    *[
        (False, hi + lo)
        for hi in (b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf")
        for lo in (b"\xed\xb0\x80", b"\xed\xbf\xbf")
    ],
    # Non-characters and specials are valid UTF-8.
    *[
        (True, s)
        for s in (
            b"\xef\xbf\xbe",
            b"\xef\xbf\xbf",
            b"\xf0\x9f\xbf\xbe",
            b"\xf4\x8f\xbf\xbe",
            b"\xef\xbf\xb9",
            b"\xef\xbf\xbc",
        )
    ],
]


def _utf8() -> list[Case]:
    """Section 6 (the full sequence list runs against the codec alone, in test_wsframes)."""
    valid = "Hello-µ@ßöäüàá-UTF-8!!".encode()
    bad = KOSME + b"\xed\xa0\x80" + b"edited"
    part1, part2, part3 = KOSME, b"\xf4\x90\x80\x80", b"edited"  # 6.4: 0x110000 is out of range
    cases = [
        _case("6.1.1", _t(b""), messages=("",)),
        _case(
            "6.1.2",
            _t(b"", fin=False),
            Frame(CONTINUATION, b"", fin=False),
            Frame(CONTINUATION, b""),
            messages=("",),
        ),
        _case(
            "6.1.3",
            _t(b"", fin=False),
            Frame(CONTINUATION, b"middle frame payload", fin=False),
            Frame(CONTINUATION, b""),
            messages=("middle frame payload",),
        ),
        _case("6.2.1", _t(valid), messages=(valid.decode(),)),
        _case(
            "6.2.2", _t(valid[:12], fin=False), Frame(CONTINUATION, valid[12:]), messages=(valid.decode(),)
        ),
        _case("6.2.3", *fragments(TEXT, valid, 1), messages=(valid.decode(),)),
        _case("6.2.4", *fragments(TEXT, KOSME, 1), messages=(KOSME.decode(),)),
        _case("6.3.1", _t(bad), **FAIL_1007),
        _case("6.3.2", *fragments(TEXT, bad, 1), **FAIL_1007),
        # Fail fast: at the fragment (6.4.1, 6.4.2) or the piece of a frame
        # (6.4.3, 6.4.4) that makes the text invalid, not at its end.
        _case(
            "6.4.1",
            _t(part1, fin=False),
            Pause(0.1),
            Frame(CONTINUATION, part2, fin=False),
            Pause(2),
            Frame(CONTINUATION, part3),
            fail_fast=True,
            **FAIL_1007,
        ),
        _case(
            "6.4.2",
            _t((part1 + part2)[:12], fin=False),
            Pause(0.1),
            Frame(CONTINUATION, (part1 + part2)[12:13], fin=False),
            Pause(2),
            Frame(CONTINUATION, (part1 + part2)[13:] + part3),
            fail_fast=True,
            **FAIL_1007,
        ),
        _case(
            "6.4.3",
            *_one_frame_in_pieces(part1 + part2 + part3, [len(part1), len(part1) + 4]),
            fail_fast=True,
            **FAIL_1007,
        ),
        _case("6.4.4", *_one_frame_in_pieces(part1 + part2 + part3, [12, 13]), fail_fast=True, **FAIL_1007),
    ]
    # A sample of the sequences over the wire: each in one frame and
    # fragmented an octet at a time.
    sample = [
        b"hello\xc2\xa2world",
        b"hello\xf0\xa4\xad\xa2world",
        b"\xf4\x8f\xbf\xbf",
        b"\xef\xbf\xbd",
        b"\xf8\x88\x80\x80\x80",
        b"\xf4\x90\x80\x80",
        b"\x80\xbf",
        b"\xc0 \xc1 ",
        b"\xdf",
        b"\xfe\xfe\xff\xff",
        b"\xc0\xaf",
        b"\xe0\x80\x80",
        b"\xed\xa0\x80",
        b"\xed\xa0\x80\xed\xb0\x80",
    ]
    for n, data in enumerate(sample, 5):
        ok = is_utf8(data)
        expect: dict[str, object] = {"messages": (data.decode(),)} if ok else dict(FAIL_1007)
        cases.append(_case(f"6.{n}.1", _t(data), **expect))
        cases.append(_case(f"6.{n}.2", *fragments(TEXT, data, 1), **expect))
    return cases


def is_utf8(data: bytes) -> bool:
    """Python's strict decoder's verdict on `data`."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _one_frame_in_pieces(payload: bytes, cuts: list[int]) -> list[Step]:
    """One text frame whose payload goes out in pieces cut at `cuts`, with a
    pause after the first piece (short) and the second (long)."""
    bounds = [0, *cuts, len(payload)]
    head = _RawHead(TEXT, payload)
    steps: list[Step] = [head.piece(0, bounds[1])]
    for i in range(1, len(bounds) - 1):
        steps += [Pause(0.1 if i == 1 else 2), head.piece(bounds[i], bounds[i + 1])]
    return steps


@dataclass(frozen=True)
class _Raw(Frame):
    """Bytes sent as they are (the masking of a frame sent in pieces is done
    once for the whole frame, so each piece is a slice of the same wire)."""

    raw_client: bytes = b""
    raw_server: bytes = b""

    def wire(self, *, masked: bool) -> bytes:
        return self.raw_client if masked else self.raw_server


class _RawHead:
    def __init__(self, opcode: int, payload: bytes) -> None:
        frame = Frame(opcode, payload)
        self.client, self.server = frame.wire(masked=True), frame.wire(masked=False)
        self.client_head = len(self.client) - len(payload)
        self.server_head = len(self.server) - len(payload)

    def piece(self, start: int, end: int) -> _Raw:
        c0 = 0 if start == 0 else self.client_head + start
        s0 = 0 if start == 0 else self.server_head + start
        return _Raw(
            TEXT,
            raw_client=self.client[c0 : self.client_head + end],
            raw_server=self.server[s0 : self.server_head + end],
        )


def _close_handling() -> list[Case]:
    """Section 7: the closing handshake, close codes and reasons."""
    msg = send_json("7.1.1")
    late = send_json("7.1.4")
    big = send_json("7.1.6-big", 256 * 1024)
    small = send_json("7.1.6")
    cases = [
        _case("7.1.1", _t(msg), close_frame(1000), messages=(msg,)),
        _case("7.1.2", close_frame(1000), close_frame(1000)),
        _case("7.1.3", close_frame(1000), Frame(PING)),
        _case("7.1.4", close_frame(1000), _t(late)),
        _case("7.1.5", _t(b"fragment1", fin=False), close_frame(1000), Frame(CONTINUATION, b"fragment2")),
        _case("7.1.6", _t(big), _t(small), close_frame(1000), Frame(PING), messages=(big, small)),
        _case("7.3.1", close_frame(None), close=None),
        _case("7.3.2", Frame(CLOSE, b"\x03"), **FAIL_1002),
        _case("7.3.3", close_frame(1000)),
        _case("7.3.4", close_frame(1000, b"Hello World!")),
        _case("7.3.5", close_frame(1000, b"*" * 123)),
        _case("7.3.6", close_frame(1000, b"*" * 124), **FAIL_1002),
        _case("7.5.1", close_frame(1000, KOSME + b"\xed\xa0\x80edited"), **FAIL_1007),
    ]
    valid = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
    cases += [_case(f"7.7.{n}", close_frame(code), close=code) for n, code in enumerate(valid, 1)]
    invalid = [0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999]
    cases += [_case(f"7.9.{n}", close_frame(code), **FAIL_1002) for n, code in enumerate(invalid, 1)]
    cases += [_case(f"7.13.{n}", close_frame(code), **FAIL_1002) for n, code in enumerate([5000, 65535], 1)]
    return cases


def _limits() -> list[Case]:
    """Section 9, scaled to the 4 MiB limit, and the limit itself (1009)."""
    mib = 1024 * 1024
    text_64k, text_1m, text_4m = (
        send_json(f"9.1.{n}", size) for n, size in ((1, 65536), (3, mib), (5, LIMIT))
    )
    frag_1m = send_json("9.3.1", mib)
    frag_4m = send_json("9.3.9", LIMIT)
    chop_256k = send_json("9.5.1", 256 * 1024)
    chop_1m = send_json("9.5.6", mib)
    binary = os.urandom(mib)
    small = [send_json(f"9.7.{i}", 64) for i in range(1000)]
    return [
        _case("9.1.1", _t(text_64k), messages=(text_64k,)),
        _case("9.1.3", _t(text_1m), messages=(text_1m,)),
        _case("9.1.5 (at the limit)", _t(text_4m), messages=(text_4m,)),
        _case("9.2.3", Frame(BINARY, binary), messages=(binary,)),
        _case("9.3.1", *fragments(TEXT, frag_1m.encode(), 64), messages=(frag_1m,)),
        _case("9.3.9", *fragments(TEXT, frag_4m.encode(), 65536), messages=(frag_4m,)),
        _case("9.4.3", *fragments(BINARY, binary, 256), messages=(binary,)),
        _case("9.5.1", _t(chop_256k), chop=64, messages=(chop_256k,)),
        _case("9.5.6", _t(chop_1m), chop=1460, messages=(chop_1m,)),
        _case("9.6.6", Frame(BINARY, binary), chop=1460, messages=(binary,)),
        _case("9.7.1", *[_t(m) for m in small], messages=tuple(small)),
        # Over the limit: refused from the header, before the payload.
        _case("9.x over the limit", Frame(TEXT, b"x" * 16, length=LIMIT + 1), **FAIL_1009),
        _case("9.x 8 MiB binary", Frame(BINARY, b"\xfe" * 16, length=2 * LIMIT), **FAIL_1009),
        _case(
            "9.x fragments over the limit",
            Frame(BINARY, b"\xfe" * (LIMIT // 2 + 1), fin=False),
            Frame(CONTINUATION, b"\xfe" * 16, length=LIMIT // 2),
            **FAIL_1009,
        ),
    ]


CASES: list[Case] = [
    *_framing(),
    *_ping_pong(),
    *_reserved_bits(),
    *_opcodes(),
    *_fragmentation(),
    *_utf8(),
    *_close_handling(),
    *_limits(),
]
