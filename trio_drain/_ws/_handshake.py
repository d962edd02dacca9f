"""RFC 6455's opening handshake as pure functions: the HTTP upgrade, no I/O.

The client's request (`client_request`) and the check of the server's answer
(`check_response`), the server's answer to a request (`server_response`),
and finding where a head ends in what was read (`split_head`). Bytes in,
bytes or a verdict out; the stream's I/O is `_engine.read_head`, driven by
`_client` and `_server`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Longest handshake head (request or response line plus headers) we read.
MAX_HEAD = 16 * 1024


class HandshakeFailed(Exception):
    """The opening handshake was refused or malformed.

    On the server side `response` is the HTTP error to answer with.
    """

    def __init__(self, reason: str, response: bytes = b"") -> None:
        super().__init__(reason)
        self.response = response


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
    return buffer[:end], buffer[end + 4 :]


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
    if not headers.get("host"):  # required of every HTTP/1.1 request, and named by RFC 6455 4.2.1
        raise HandshakeFailed("no Host header", _http_error(400, "Bad Request"))
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
