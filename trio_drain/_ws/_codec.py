"""RFC 6455's framing as a pure codec: frames out, events in, no I/O.

In the manner of h11: bytes in, events out; bytes to send are returned,
never written here. `_engine` drives it over a Trio stream; the opening
handshake before the first frame is `_handshake`'s.

Why not wsproto, which does this well? A drain moves thousands of small
frames a second, and wsproto's general machinery (event objects, a
generator per parse, per-byte masking) was a third of the drain's CPU. This
codec does only what the wire protocol here needs: text and binary
messages (fragmented or not), ping, pong and close, no extensions, and it
enforces what a peer may not do (reserved bits, unmasked client frames,
oversized or fragmented control frames, lengths not in their shortest
form, bad UTF-8, bad close codes), failing it with the close code RFC
6455 names. `tests/test_conformance*.py` hold it to cases modelled on the
Autobahn test suite, and to wsproto on random byte streams.
"""

from __future__ import annotations

import codecs
import struct
from typing import Literal, cast

from .._ids import random_bytes

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never on the wire: "the close frame had no code"
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

Message = tuple[Literal["message"], "str | bytes"]
Control = tuple[Literal["ping", "pong"], bytes]
Close = tuple[Literal["close"], int, str]
Event = Message | Control | Close


class ProtocolError(Exception):
    """The peer broke the protocol; close with `code`.

    `events` are those the same `receive` call parsed before the offending
    frame: they happened, and are to be handled before the failure.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.events: list[Event] = []


def mask(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the 4-byte `key` repeated (masking and unmasking alike)."""
    n = len(data)
    if not n:
        return b""
    stream = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame. Clients mask every frame; servers never do."""
    n = len(payload)
    first = 0x80 | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = random_bytes(4)
    return head + key + mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """Code and reason, the reason cut to the 123 bytes a control frame has
    room for, on a character boundary (a cut character would be bad UTF-8)."""
    return struct.pack("!H", code) + reason.encode()[:123].decode("utf-8", "ignore").encode()


def _valid_close_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameCodec:
    """Frames out, events in, for one end of a connection.

    Args:
        client: this end is the client (masks what it sends, expects the
            server's frames unmasked) or the server (the reverse).
        max_message_size: longest message (after reassembly) accepted.

    A data frame whose payload arrives over several reads is taken as it
    comes (unmasked, and text decoded, piece by piece): a long frame costs
    time linear in its length however finely TCP cuts it, and bad UTF-8
    fails the connection at the piece that carries it, not at the end of
    the message. Nothing is parsed after a close frame or a protocol error.
    """

    def __init__(self, *, client: bool, max_message_size: int) -> None:
        self._client = client
        self._max = max_message_size
        self._mask_bit = 0 if client else 0x80  # the mask bit every frame we receive must have
        self._buffer = b""  # a frame's start whose header (or short control frame) is incomplete
        # The data frame whose payload is still arriving (header parsed):
        self._remaining = 0  # its payload bytes yet to come
        self._key = b""  # its masking key, rotated to the next byte to come (b"" if unmasked)
        self._frame_fin = False
        # The message being assembled (over fragments, or pieces of one frame):
        self._opcode: int | None = None  # OP_TEXT or OP_BINARY while one is under way
        self._parts: list[str] | list[bytes] = []
        self._size = 0  # its payload bytes so far
        self._decoder: codecs.IncrementalDecoder | None = None  # for a text message
        self._done: ProtocolError | None = None  # why nothing more is parsed
        self._stopped = False

    # -- out

    def text(self, message: str) -> bytes:
        return encode_frame(OP_TEXT, message.encode(), masked=self._client)

    def ping(self, payload: bytes) -> bytes:
        return encode_frame(OP_PING, payload, masked=self._client)

    def pong(self, payload: bytes) -> bytes:
        return encode_frame(OP_PONG, payload, masked=self._client)

    def close(self, code: int, reason: str = "") -> bytes:
        payload = b"" if code == CLOSE_NO_STATUS else close_payload(code, reason)
        return encode_frame(OP_CLOSE, payload, masked=self._client)

    # -- in

    def receive(self, data: bytes) -> list[Event]:
        """Parse `data` (any amount) into the events it completes.

        After a close frame the rest is ignored (an empty list).

        Raises:
            ProtocolError: the peer broke the protocol; nothing after the
                offending frame is parsed, and the events before it are in
                the exception's `events`.
        """
        events: list[Event] = []
        if self._stopped:
            if self._done is not None:
                raise ProtocolError(self._done.code, self._done.reason)
            return events
        try:
            if self._remaining:
                data = self._payload_piece(data, events)
                if not data:
                    return events
            self._parse(self._buffer + data if self._buffer else data, events)
        except ProtocolError as exc:
            exc.events = events
            self._done, self._stopped, self._buffer = exc, True, b""
            raise
        return events

    def _parse(self, buffer: bytes, events: list[Event]) -> None:
        at, end = 0, len(buffer)
        mask_bit = self._mask_bit
        try:
            while end - at >= 2:
                first, second = buffer[at], buffer[at + 1]
                opcode = first & 0x0F
                length = second & 0x7F
                if first & 0x70 or (second & 0x80) != mask_bit or opcode > OP_BINARY:
                    self._check_header(first, second, opcode, length)
                head = 2
                if length > 125:  # an extended length, which must be the shortest that fits (5.2)
                    if length == 126:
                        if end - at < 4:
                            break
                        length = int.from_bytes(buffer[at + 2 : at + 4], "big")
                        if length < 126:
                            raise ProtocolError(
                                CLOSE_PROTOCOL_ERROR, "16-bit length for a payload under 126 bytes"
                            )
                        head = 4
                    else:
                        if end - at < 10:
                            break
                        length = int.from_bytes(buffer[at + 2 : at + 10], "big")
                        if length < 65536:
                            raise ProtocolError(
                                CLOSE_PROTOCOL_ERROR, "64-bit length for a payload under 64 KiB"
                            )
                        if length >> 63:
                            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length with its top bit set")
                        head = 10
                if opcode < OP_CLOSE and self._size + length > self._max:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
                if mask_bit:
                    head += 4
                frame_end = at + head + length
                if frame_end > end:
                    if opcode < OP_CLOSE and at + head <= end:  # a data frame's payload, arriving in pieces
                        self._begin(opcode)
                        self._frame_fin = bool(first & 0x80)
                        self._remaining = length
                        self._key = buffer[at + head - 4 : at + head] if mask_bit else b""
                        self._payload_piece(buffer[at + head : end], events)
                        at = end
                    break  # (a short control frame or a header waits for the rest)
                payload = buffer[at + head : frame_end]
                if mask_bit:
                    payload = mask(payload, buffer[at + head - 4 : at + head])
                at = frame_end
                if opcode >= OP_CLOSE:
                    if opcode == OP_PING:
                        events.append(("ping", payload))
                    elif opcode == OP_PONG:
                        events.append(("pong", payload))
                    else:
                        events.append(_parse_close(payload))
                        self._stopped = True
                        at = end
                        break
                elif opcode and first & 0x80 and self._opcode is None:  # the common case: a whole message
                    events.append(("message", _decode(payload) if opcode == OP_TEXT else payload))
                else:
                    self._begin(opcode)
                    message = self._add(payload, bool(first & 0x80))
                    if message is not None:
                        events.append(message)
        finally:
            self._buffer = buffer[at:]

    def _check_header(self, first: int, second: int, opcode: int, length: int) -> None:
        """Refuse what a frame's first two bytes show to be wrong."""
        if first & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if (second & 0x80) != self._mask_bit:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "frame masking is the wrong way round")
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80 or length > 125:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be final and short")
        elif opcode not in _DATA_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")

    def _begin(self, opcode: int) -> None:
        """A data frame that is not a whole message in itself starts."""
        if opcode == OP_CONTINUATION:
            if self._opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message begun")
        elif self._opcode is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
        else:
            self._opcode = opcode
            self._decoder = _utf8_decoder() if opcode == OP_TEXT else None

    def _payload_piece(self, data: bytes, events: list[Event]) -> bytes:
        """Take what `data` holds of the payload still to come; return the rest."""
        n = self._remaining
        piece, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
        if self._key:
            key = self._key
            piece = mask(piece, key)
            turn = len(piece) % 4
            if turn:
                self._key = key[turn:] + key[:turn]
        self._remaining = n - len(piece)
        message = self._add(piece, not self._remaining and self._frame_fin)
        if message is not None:
            events.append(message)
        return rest

    def _add(self, payload: bytes, last: bool) -> Message | None:
        """Add to the message under way; the message, if `last` completes it."""
        decoder = self._decoder
        if decoder is None:
            cast("list[bytes]", self._parts).append(payload)
        else:
            try:
                cast("list[str]", self._parts).append(decoder.decode(payload, last))
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
        self._size += len(payload)
        if not last:
            return None
        parts = self._parts
        whole = (
            "".join(cast("list[str]", parts)) if decoder is not None else b"".join(cast("list[bytes]", parts))
        )
        self._parts, self._size, self._opcode, self._decoder = [], 0, None, None
        return ("message", whole)


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _decode(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return ("close", CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte code")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} is not allowed")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return ("close", code, reason)
