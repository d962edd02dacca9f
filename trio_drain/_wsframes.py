"""RFC 6455 as a pure codec: the opening handshake and framing, no I/O.

In the manner of h11: bytes in, events out; bytes to send are returned,
never written here. `_transport` drives it over a Trio stream.

Why not wsproto, which does this well? A drain moves thousands of small
frames a second, and wsproto's general machinery (event objects, a
generator per parse, per-byte masking) was a third of the drain's CPU. This
codec does only what the wire protocol here needs: text and binary
messages (fragmented or not), ping, pong and close, no extensions, and it
enforces what a peer may not do (reserved bits, unmasked client frames,
oversized or fragmented control frames, bad UTF-8, bad close codes).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Mapping
from typing import Literal

from ._ids import random_bytes

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never on the wire: "the close frame had no code"
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

#: Longest handshake head (request or response line plus headers) we read.
MAX_HEAD = 16 * 1024

Message = tuple[Literal["message"], "str | bytes"]
Control = tuple[Literal["ping", "pong"], bytes]
Close = tuple[Literal["close"], int, str]
Event = Message | Control | Close


class ProtocolError(Exception):
    """The peer broke the protocol; close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class HandshakeFailed(Exception):
    """The opening handshake was refused or malformed.

    On the server side `response` is the HTTP error to answer with.
    """

    def __init__(self, reason: str, response: bytes = b"") -> None:
        super().__init__(reason)
        self.response = response


# -- framing --------------------------------------------------------------------------------


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
    """

    def __init__(self, *, client: bool, max_message_size: int) -> None:
        self._client = client
        self._max = max_message_size
        self._buffer = b""  # received bytes not yet parsed into a whole frame
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._fragment_opcode: int | None = None

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

        Raises:
            ProtocolError: the peer broke the protocol; nothing after the
                offending frame is parsed.
        """
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        at, end = 0, len(buffer)
        try:
            while end - at >= 2:
                first, second = buffer[at], buffer[at + 1]
                length = second & 0x7F
                head = 2
                if length == 126:
                    if end - at < 4:
                        break
                    length = int.from_bytes(buffer[at + 2:at + 4], "big")
                    head = 4
                elif length == 127:
                    if end - at < 10:
                        break
                    length = int.from_bytes(buffer[at + 2:at + 10], "big")
                    head = 10
                masked = second & 0x80
                opcode = first & 0x0F
                self._check_header(first, opcode, masked, length)
                if masked:
                    head += 4
                if end - at < head + length:
                    break
                payload = buffer[at + head:at + head + length]
                if masked:
                    payload = mask(payload, buffer[at + head - 4:at + head])
                at += head + length
                event = self._frame(first & 0x80, opcode, payload)
                if event is not None:
                    events.append(event)
        finally:
            self._buffer = buffer[at:]
        return events

    def _check_header(self, first: int, opcode: int, masked: int, length: int) -> None:
        if first & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if bool(masked) == self._client:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "frame masking is the wrong way round")
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80 or length > 125:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be final and short")
        elif opcode not in _DATA_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        elif self._fragment_size + length > self._max:
            raise ProtocolError(CLOSE_TOO_BIG, f"message over {self._max} bytes")

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return ("ping", payload)
        if opcode == OP_PONG:
            return ("pong", payload)
        if opcode == OP_CLOSE:
            return _parse_close(payload)
        if opcode == OP_CONTINUATION:
            if self._fragment_opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message begun")
        elif self._fragment_opcode is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
        else:
            if fin:  # the common case: a whole message in one frame
                return ("message", _decode(opcode, payload))
            self._fragment_opcode = opcode
        self._fragments.append(payload)
        self._fragment_size += len(payload)
        if not fin:
            return None
        whole, kind = b"".join(self._fragments), self._fragment_opcode
        self._fragments, self._fragment_size, self._fragment_opcode = [], 0, None
        return ("message", _decode(kind, whole))


def _decode(opcode: int, payload: bytes) -> str | bytes:
    if opcode == OP_BINARY:
        return payload
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


# -- the opening handshake -------------------------------------------------------------------


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def client_request(host: str, target: str) -> tuple[bytes, str]:
    """The upgrade request, and the key whose accept value to expect."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return request.encode(), key


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """(head, what follows it) once the head's blank line has arrived.

    Raises:
        HandshakeFailed: no blank line within MAX_HEAD bytes.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise HandshakeFailed("handshake head is too long")
        return None
    return buffer[:end], buffer[end + 4:]


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    start, *lines = head.decode("latin-1").split("\r\n")  # latin-1 decodes any byte
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise HandshakeFailed(f"malformed header line {line[:40]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return start, headers


def _has_token(headers: Mapping[str, str], name: str, token: str) -> bool:
    return token in (t.strip().lower() for t in headers.get(name, "").split(","))


def check_response(head: bytes, key: str) -> None:
    """Check the server's answer to our upgrade request.

    Raises:
        HandshakeFailed: refused (with its HTTP status) or not a valid upgrade.
    """
    start, headers = _parse_head(head)
    parts = start.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HandshakeFailed(f"not an HTTP response: {start[:60]!r}")
    if parts[1] != "101":
        raise HandshakeFailed(f"rejected with HTTP {parts[1]}")
    if not _has_token(headers, "upgrade", "websocket") or not _has_token(headers, "connection", "upgrade"):
        raise HandshakeFailed("the server did not upgrade to websocket")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeFailed("the server's Sec-WebSocket-Accept does not match our key")
    if headers.get("sec-websocket-extensions") or headers.get("sec-websocket-protocol"):
        raise HandshakeFailed("the server chose an extension or subprotocol we did not offer")


def server_response(head: bytes) -> bytes:
    """The answer to a client's upgrade request: 101, or an HTTP error.

    Raises:
        HandshakeFailed: with the HTTP error to answer in `.response`.
    """
    try:
        start, headers = _parse_head(head)
    except HandshakeFailed as exc:
        raise HandshakeFailed(str(exc), _http_error(400, "Bad Request")) from None
    method, _, rest = start.partition(" ")
    if method != "GET" or not rest.endswith("HTTP/1.1"):
        raise HandshakeFailed(f"not a GET request: {start[:60]!r}", _http_error(400, "Bad Request"))
    if not _has_token(headers, "upgrade", "websocket") or not _has_token(headers, "connection", "upgrade"):
        raise HandshakeFailed("not a websocket upgrade", _http_error(426, "Upgrade Required"))
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeFailed("unsupported websocket version", _http_error(426, "Upgrade Required"))
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeFailed("bad Sec-WebSocket-Key", _http_error(400, "Bad Request")) from None
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode()


def _http_error(status: int, text: str) -> bytes:
    extra = "Sec-WebSocket-Version: 13\r\n" if status == 426 else ""
    return f"HTTP/1.1 {status} {text}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
