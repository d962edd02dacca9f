"""The client end: `open_connection` dials a ws:// or wss:// URL over the chosen transport.

For ``"native"`` and ``"wsproto"`` it opens TCP (and TLS), does the opening
handshake with that codec, and runs an `_engine.StreamConnection` for the
caller's body; ``"trio-websocket"`` is handed to its adapter whole.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from urllib.parse import urlsplit

import trio

from . import _codec, _handshake, _wsproto
from ._connection import TRANSPORTS, Connection, TransportName, TransportRejected, describe
from ._engine import Codec, StreamConnection, read_head, running
from ._trio_websocket import open_trio_websocket


def open_connection(
    url: str,
    *,
    transport: TransportName,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    connect_timeout: float,
) -> AbstractAsyncContextManager[Connection]:
    """Connect to `url`, as an async context manager that closes on exit.

    Args:
        url: ``ws://`` or ``wss://``.
        transport: which of `TRANSPORTS` carries the connection.
        ssl_context: for ``wss://``; None for the system's verifying context.
        max_message_size: longest message accepted from the server.
        connect_timeout: seconds TCP, TLS and the opening handshake may take.

    Raises:
        ValueError: an unknown transport.
        TransportRejected: (on entry) the connection or the handshake failed.
    """
    if transport == "trio-websocket":
        return open_trio_websocket(url, ssl_context, max_message_size, connect_timeout)
    if transport in ("native", "wsproto"):
        return _stream_connection(url, ssl_context, max_message_size, connect_timeout, transport == "native")
    raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")


def _split_url(url: str) -> tuple[str, int, bool, str, str]:
    """(hostname, port, secure, request target, Host header) of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise TransportRejected(f"not a ws:// or wss:// URL: {url}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, secure, target, parts.netloc.rsplit("@", 1)[-1]


@asynccontextmanager
async def _stream_connection(
    url: str,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    connect_timeout: float,
    native: bool,
) -> AsyncIterator[Connection]:
    hostname, port, secure, target, host_header = _split_url(url)
    stream: trio.abc.Stream
    codec: Codec
    received = b""
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(hostname, port)
        except OSError as exc:
            raise TransportRejected(describe(exc)) from None
        try:
            if secure:
                stream = trio.SSLStream(
                    stream, ssl_context or ssl.create_default_context(), server_hostname=hostname
                )
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    raise TransportRejected(describe(exc)) from None
            if native:
                received = await _native_handshake(stream, host_header, target)
                codec = _codec.FrameCodec(client=True, max_message_size=max_message_size)
            else:
                codec = await _wsproto.handshake(stream, host_header, target, max_message_size)
        except BaseException:
            with (
                trio.CancelScope(shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.aclose()
            raise
    if scope.cancelled_caught:
        raise TransportRejected("timed out connecting")
    connection = StreamConnection(stream, codec, received=received)
    try:
        async with running(connection.reader, connection.writer, leave=connection.leave):
            yield connection
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


async def _native_handshake(stream: trio.abc.Stream, host: str, target: str) -> bytes:
    """Upgrade the connection; return any bytes that came after the server's answer."""
    request, key = _handshake.client_request(host, target)
    try:
        await stream.send_all(request)
        head, rest = await read_head(stream)
        _handshake.check_response(head, key)
    except (trio.BrokenResourceError, trio.ClosedResourceError, _handshake.HandshakeFailed) as exc:
        raise TransportRejected(describe(exc)) from None
    return rest
