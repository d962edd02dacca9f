"""WebSocket client transports behind one small seam.

`WebSocketBroker` needs little of a WebSocket: connect, send a text frame,
read the next message, ping and wait for the pong, close. Two transports
provide it:

- ``"trio-websocket"``: the trio-websocket library.
- ``"wsproto"``: wsproto driven directly on a Trio stream, with write
  coalescing: frames queued while a write is in progress go out together in
  one ``send_all``, so a pipelined burst of sends costs one syscall rather
  than one each.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Protocol
from urllib.parse import urlsplit

import trio
import trio_websocket
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from . import _crashpoints

log = logging.getLogger("trio_drain.transport")

TransportName = Literal["wsproto", "trio-websocket"]
TRANSPORTS: tuple[TransportName, ...] = ("wsproto", "trio-websocket")


class TransportClosed(Exception):
    """The connection is closed (by either side, or because the stream broke)."""


class TransportRejected(Exception):
    """The server refused the WebSocket handshake, or the connection failed."""


class Connection(Protocol):
    async def send_message(self, message: str) -> None:
        """Queue one text frame. Raises TransportClosed if closed."""

    def send_message_nowait(self, message: str) -> None:
        """Queue one text frame without waiting. Raises TransportClosed if closed."""

    async def get_message(self) -> str | bytes:
        """The next whole message. Raises TransportClosed once closed."""

    async def get_messages(self) -> list[str | bytes]:
        """Every whole message received so far (at least one), in order.

        One checkpoint for a burst of messages rather than one each. Raises
        TransportClosed once closed and every message has been read.
        """

    async def ping(self) -> None:
        """Send a ping and wait for its pong. Raises TransportClosed."""


def open_connection(
    url: str, *, transport: TransportName, ssl_context: ssl.SSLContext | None, max_message_size: int,
    connect_timeout: float,
) -> AbstractAsyncContextManager[Connection]:
    if transport == "trio-websocket":
        return _trio_websocket(url, ssl_context, max_message_size, connect_timeout)
    if transport == "wsproto":
        return _wsproto(url, ssl_context, max_message_size, connect_timeout)
    raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")


# -- trio-websocket ----------------------------------------------------------------------------


class _TrioWebsocketConnection:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        # trio-websocket only sends from a task: nowait sends queue for `writer`.
        self._queued, self._to_write = trio.open_memory_channel[str](math.inf)

    async def send_message(self, message: str) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            raise TransportClosed(str(self._ws.closed)) from None

    def send_message_nowait(self, message: str) -> None:
        if self._ws.closed is not None:
            raise TransportClosed(str(self._ws.closed))
        self._queued.send_nowait(message)

    async def writer(self) -> None:
        async for message in self._to_write:
            try:
                await self._ws.send_message(message)
            except trio_websocket.ConnectionClosed:
                return  # the reader sees it too; outstanding sends fail there

    async def get_message(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(str(exc.reason)) from None

    async def get_messages(self) -> list[str | bytes]:
        return [await self.get_message()]

    async def ping(self) -> None:
        try:
            await self._ws.ping()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(str(exc.reason)) from None


@asynccontextmanager
async def _trio_websocket(
    url: str, ssl_context: ssl.SSLContext | None, max_message_size: int, connect_timeout: float
) -> AsyncIterator[Connection]:
    entered = body_done = False
    stream: trio.abc.AsyncResource | None = None
    try:
        async with trio_websocket.open_websocket_url(
            url, ssl_context, max_message_size=max_message_size, connect_timeout=connect_timeout,
            disconnect_timeout=2.0,
        ) as ws:
            entered = True
            stream = getattr(ws, "_stream", None)
            connection = _TrioWebsocketConnection(ws)
            async with _running(connection.writer):
                yield connection
            body_done = True
    except (OSError, trio_websocket.HandshakeError) as exc:
        if body_done:
            return  # the close handshake failed (e.g. DisconnectionTimeout): we are leaving anyway
        if entered:
            raise
        raise TransportRejected(_describe(exc)) from None
    finally:
        # trio-websocket's client waits for the server to close TCP and can
        # leave its socket open when the peer vanished; close it ourselves.
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


# -- wsproto on a Trio stream ----------------------------------------------------------------------


class _WsprotoConnection:
    """A WebSocket (client or server end) over a Trio stream, frames coalesced on write."""

    def __init__(
        self, stream: trio.abc.Stream, ws: wsproto.WSConnection, max_message_size: int, *,
        server: bool = False,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message_size
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._inbox: collections.deque[str | bytes] = collections.deque()
        self._arrived = trio.Event()  # set when _inbox gains a message or we close
        self._pings: dict[bytes, trio.Event] = {}
        self._closed: str | None = None
        self._parts: list[str | bytes] = []
        self._part_size = 0
        # Fault injection (tests only): crash once a message after the hello
        # has been written to the socket.
        self._crash_on_send = not server and _crashpoints.armed("send_left")
        # A server that closes waits for the client's close frame before
        # dropping TCP (RFC 6455 7.1.1), so the client can close cleanly.
        self._server = server
        self._peer_gone = trio.Event()  # the peer's close frame or EOF arrived
        self._reading = False  # the reader task is running
        self._messages_queued = 0
        self._message_in_out = False  # the bytes in _out carry a message (not just a ping)
        self._writing = False  # the writer task is running

    # -- the seam

    async def send_message(self, message: str) -> None:
        self.send_message_nowait(message)
        if len(self._out) > 4 * 1024 * 1024:  # backpressure on a slow peer
            await self._drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    def send_message_nowait(self, message: str) -> None:
        self._check_open()
        self._queue(self._ws.send(TextMessage(data=message)))
        self._messages_queued += 1
        self._message_in_out = True

    async def get_message(self) -> str | bytes:
        await self._wait_for_inbox()
        return self._inbox.popleft()

    async def get_messages(self) -> list[str | bytes]:
        await self._wait_for_inbox()
        messages = list(self._inbox)
        self._inbox.clear()
        return messages

    async def _wait_for_inbox(self) -> None:
        while not self._inbox:
            if self._closed is not None:
                raise TransportClosed(self._closed)
            await self._arrived.wait()
            self._arrived = trio.Event()
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
        self._check_open()
        payload = os.urandom(8)
        pong = self._pings[payload] = trio.Event()
        self._queue(self._ws.send(Ping(payload=payload)))
        await pong.wait()
        self._check_open()

    # -- plumbing

    def _check_open(self) -> None:
        if self._closed is not None:
            raise TransportClosed(self._closed)

    def _queue(self, data: bytes) -> None:
        self._out += data
        self._drained = trio.Event() if self._drained.is_set() else self._drained
        self._out_ready.set()

    async def writer(self) -> None:
        self._writing = True
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                data, self._out = bytes(self._out), bytearray()
                carries_message, self._message_in_out = self._message_in_out, False
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._close("the connection broke while writing")
                    return
                if self._crash_on_send and carries_message and self._messages_queued > 1:
                    _crashpoints.reached("send_left")
                if not self._out:
                    self._drained.set()
        finally:
            self._writing = False
            self._drained.set()  # nobody is left to drain it: don't keep aclose waiting

    async def reader(self) -> None:
        self._reading = True
        try:
            # Reads on after we close, until the peer's close frame or EOF.
            while not self._peer_gone.is_set():
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._close("the peer closed the TCP connection")
                    return
                self._ws.receive_data(bytes(data))
                self._handle_events()
        except wsproto.utilities.RemoteProtocolError as exc:
            self._close(f"protocol error: {exc}")
        finally:
            self._reading = False
            self._peer_gone.set()

    async def _read_until_peer_closes(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 wsproto.utilities.RemoteProtocolError):
            while data := await self._stream.receive_some(65536):
                self._ws.receive_data(bytes(data))
                if any(isinstance(e, CloseConnection) for e in self._ws.events()):
                    return

    def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(bytes(event.data) if isinstance(event.data, bytearray) else event.data)
                self._part_size += len(event.data)
                if self._part_size > self._max:
                    self._queue(self._ws.send(CloseConnection(code=1009, reason="message too big")))
                    self._close(f"message over {self._max} bytes")
                    return
                if event.message_finished:
                    first = self._parts[0]
                    whole = "".join(self._parts) if isinstance(first, str) else b"".join(self._parts)  # type: ignore[arg-type]
                    self._parts, self._part_size = [], 0
                    self._inbox.append(whole)
                    self._arrived.set()
            elif isinstance(event, Ping):
                self._queue(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                # A pong answers its ping and every ping sent before it.
                for payload in list(self._pings):
                    self._pings.pop(payload).set()
                    if payload == event.payload:
                        break
            elif isinstance(event, CloseConnection):
                if self._ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                    self._queue(self._ws.send(event.response()))
                self._close(f"closed by the peer: {event.code} {event.reason or ''}".strip())
                self._peer_gone.set()

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
            self._arrived.set()
            for pong in self._pings.values():
                pong.set()
            self._pings.clear()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame (if still open) and close the stream."""
        initiated = self._closed is None and self._ws.state is wsproto.connection.ConnectionState.OPEN
        if initiated:
            self._queue(self._ws.send(CloseConnection(code=code, reason=reason)))
            self._close("closed by us")
        with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if self._writing:  # it owns the stream's sending side: let it flush
                await self._drained.wait()
            elif self._out:
                await self._stream.send_all(bytes(self._out))
            if initiated and self._server:
                await (self._peer_gone.wait() if self._reading else self._read_until_peer_closes())
        await self._stream.aclose()


@asynccontextmanager
async def _wsproto(
    url: str, ssl_context: ssl.SSLContext | None, max_message_size: int, connect_timeout: float
) -> AsyncIterator[Connection]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise TransportRejected(f"not a ws:// or wss:// URL: {url}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    stream: trio.abc.Stream
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(parts.hostname, port)
            if secure:
                stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                        server_hostname=parts.hostname)
                await stream.do_handshake()
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise TransportRejected(_describe(exc)) from None
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        try:
            await stream.send_all(ws.send(Request(host=host_header, target=target)))
            await _await_accept(stream, ws)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
    if scope.cancelled_caught:
        raise TransportRejected("timed out connecting")
    connection = _WsprotoConnection(stream, ws, max_message_size)
    try:
        async with _running(connection.reader, connection.writer):
            yield connection
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


# -- the server end (the reference broker's) --------------------------------------------------


ServerConnection = _WsprotoConnection


async def serve_websocket(
    handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int, *,
    max_message_size: int, handshake_timeout: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections on (host, port) and run `handler` for
    each, until cancelled. `task_status.started` gets the bound port.

    The same wsproto connection as the client's, so a server's acks are
    coalesced into few writes and read in bursts, too. Any request path is
    accepted.
    """

    async def serve_stream(stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            with trio.move_on_after(handshake_timeout):
                accepted = await _accept_request(stream, ws)
        except (trio.BrokenResourceError, trio.ClosedResourceError, wsproto.utilities.RemoteProtocolError):
            accepted = False
        if not accepted:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        connection = _WsprotoConnection(stream, ws, max_message_size, server=True)
        try:
            async with _running(connection.reader, connection.writer):
                await handler(connection)
        except TransportClosed:
            pass
        except Exception:  # one connection's failure must not stop the server
            log.exception("websocket connection handler failed")
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve_stream, listeners)


async def _accept_request(stream: trio.abc.Stream, ws: wsproto.WSConnection) -> bool:
    """Read the opening handshake and accept it; False if the peer left first."""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return False
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
                return True


@asynccontextmanager
async def _running(*tasks: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run a connection's background tasks around the caller's body.

    The tasks handle their own failures, so whatever a nursery would group
    came from the caller's body: it is handed back unwrapped.
    """
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _await_accept(stream: trio.abc.Stream, ws: wsproto.WSConnection) -> None:
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportRejected(_describe(exc)) from None
        if not data:
            raise TransportRejected("the server closed the connection during the handshake")
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, (RejectConnection, RejectData)):
                status = getattr(event, "status_code", "?")
                raise TransportRejected(f"rejected with HTTP {status}")


def _describe(exc: BaseException) -> str:
    """A one-line reason for a failed connection."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"rejected with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "timed out connecting"
    cause = exc.__cause__ or exc.__context__
    if not str(exc) and cause is not None:
        return _describe(cause)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
