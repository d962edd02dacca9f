"""WebSocket client transports behind one small seam.

`WebSocketBroker` needs little of a WebSocket: connect, send a text frame,
read the messages that arrived, ping and wait for the pong, close. Three
transports provide it:

- ``"native"`` (the default): our own connection on a Trio stream with the
  RFC 6455 codec of `_codec`. Frames queued while a write is in progress
  go out together in one ``send_all``, so a pipelined burst of sends costs
  one system call, and a burst of acks is parsed in one pass.
- ``"wsproto"``: the same connection with wsproto as the codec.
- ``"trio-websocket"``: the trio-websocket library.

The reference broker serves with the native connection too (`serve_websocket`).
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

from .. import _crashpoints
from . import _codec

log = logging.getLogger("trio_drain.transport")

TransportName = Literal["native", "wsproto", "trio-websocket"]
TRANSPORTS: tuple[TransportName, ...] = ("native", "wsproto", "trio-websocket")

#: Seconds the closing handshake may take (the native connection's, client
#: and server) before TCP is closed regardless.
CLOSE_TIMEOUT = 1.0


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
    url: str,
    *,
    transport: TransportName,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    connect_timeout: float,
) -> AbstractAsyncContextManager[Connection]:
    if transport == "trio-websocket":
        return _trio_websocket(url, ssl_context, max_message_size, connect_timeout)
    if transport in ("native", "wsproto"):
        return _stream_connection(url, ssl_context, max_message_size, connect_timeout, transport == "native")
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
            url,
            ssl_context,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
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
    except Exception as exc:
        if entered:
            raise
        # trio-websocket lets other errors out of a handshake that went wrong
        # (h11's, for a malformed or mismatched answer): still a refusal.
        raise TransportRejected(f"handshake failed: {_describe(exc)}") from None
    finally:
        # trio-websocket's client waits for the server to close TCP and can
        # leave its socket open when the peer vanished; close it ourselves.
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


# -- our own connection over a Trio stream, with either codec ---------------------------------------


class _Codec(Protocol):
    """Frames out, events in: `_codec.FrameCodec`, or wsproto behind `_WsprotoCodec`."""

    def text(self, message: str) -> bytes: ...

    def ping(self, payload: bytes) -> bytes: ...

    def pong(self, payload: bytes) -> bytes: ...

    def close(self, code: int, reason: str = "") -> bytes: ...

    def receive(self, data: bytes) -> list[_codec.Event]: ...


class _WsprotoCodec:
    """wsproto's connection (after its handshake) as a `_Codec`."""

    def __init__(self, ws: wsproto.WSConnection, max_message_size: int) -> None:
        self._ws = ws
        self._max = max_message_size
        self._parts: list[str | bytes] = []
        self._part_size = 0

    def text(self, message: str) -> bytes:
        return self._ws.send(TextMessage(data=message))

    def ping(self, payload: bytes) -> bytes:
        return self._ws.send(Ping(payload=payload))

    def pong(self, payload: bytes) -> bytes:
        return self._ws.send(Pong(payload=payload))

    def close(self, code: int, reason: str = "") -> bytes:
        try:
            return self._ws.send(CloseConnection(code=code, reason=reason or None))
        except wsproto.utilities.LocalProtocolError:
            return b""  # wsproto has closed already (after a protocol error)

    def receive(self, data: bytes) -> list[_codec.Event]:
        self._ws.receive_data(data)
        events: list[_codec.Event] = []
        try:
            for event in self._ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._parts.append(bytes(event.data) if isinstance(event.data, bytearray) else event.data)
                    self._part_size += len(event.data)
                    if self._part_size > self._max:
                        error = _codec.ProtocolError(_codec.CLOSE_TOO_BIG, f"message over {self._max} bytes")
                        error.events = events
                        raise error
                    if event.message_finished:
                        first = self._parts[0]
                        whole = "".join(self._parts) if isinstance(first, str) else b"".join(self._parts)  # type: ignore[arg-type]
                        self._parts, self._part_size = [], 0
                        events.append(("message", whole))
                elif isinstance(event, Ping):
                    events.append(("ping", bytes(event.payload)))
                elif isinstance(event, Pong):
                    events.append(("pong", bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    events.append(("close", event.code, event.reason or ""))
        except wsproto.utilities.RemoteProtocolError as exc:
            error = _codec.ProtocolError(_codec.CLOSE_PROTOCOL_ERROR, str(exc))
            error.events = events
            raise error from None
        return events


class _StreamConnection:
    """A WebSocket (client or server end) over a Trio stream.

    A writer task sends whatever was queued since its last write in one
    `send_all` (a pipelined burst of frames costs one system call), and a
    reader task parses what arrives into a queue that `get_messages` takes
    whole. The codec does the protocol; this does the I/O and the close
    handshake.

    Closing (RFC 6455 7.1.1), also when the connection's user is cancelled:
    the writer finishes the write it is in (it is shielded, and given
    `CLOSE_TIMEOUT` once the connection is being left, so a frame is never
    cut in half), then `aclose` sends a close frame, waits for the peer's
    (and a client for the server's end of TCP), and closes TCP; all of it
    within `CLOSE_TIMEOUT`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        codec: _Codec,
        *,
        server: bool = False,
        received: bytes = b"",
    ) -> None:
        self._stream = stream
        self._codec = codec
        self._received = received  # bytes that came with the handshake
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._inbox: collections.deque[str | bytes] = collections.deque()
        self._arrived = trio.Event()  # set when _inbox gains a message or we close
        self._pings: dict[bytes, trio.Event] = {}
        self._closed: str | None = None
        self._sent_close = False
        # Fault injection (tests only): crash once a message after the hello
        # has been written to the socket.
        self._crash_on_send = not server and _crashpoints.armed("send_left")
        self._server = server
        # Set when the peer is done talking: its close frame or EOF arrived,
        # or it broke the protocol (nothing more it says can be trusted).
        self._peer_gone = trio.Event()
        self._failed = False  # we failed the connection (a protocol error)
        self._eof = False  # the peer closed its side of TCP
        self._reading = False  # the reader task is running
        self._reader_done = trio.Event()
        self._messages_queued = 0
        self._message_in_out = False  # the bytes in _out carry a message (not just a ping)
        self._writing = False  # the writer task is running
        self._writer_scope = trio.CancelScope(shield=True)
        self._mid_write = False
        self._write_torn = False  # a write was cut off: no frame can follow it
        self._leaving = False  # the connection is being left: the writer flushes and ends
        self._close_deadline = math.inf  # when closing gives up

    # -- the seam

    async def send_message(self, message: str) -> None:
        self.send_message_nowait(message)
        if len(self._out) > 4 * 1024 * 1024:  # backpressure on a slow peer
            await self._drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    def send_message_nowait(self, message: str) -> None:
        self._check_open()
        self._queue(self._codec.text(message))
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
        self._queue(self._codec.ping(payload))
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
            with self._writer_scope:  # shielded: see `leave`
                while True:
                    await self._out_ready.wait()
                    self._out_ready = trio.Event()
                    if self._out:
                        data, self._out = bytes(self._out), bytearray()
                        carries_message, self._message_in_out = self._message_in_out, False
                        self._mid_write = True
                        try:
                            await self._stream.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            self._close("the connection broke while writing")
                            return
                        self._mid_write = False
                        if self._crash_on_send and carries_message and self._messages_queued > 1:
                            _crashpoints.reached("send_left")
                    if not self._out:
                        self._drained.set()
                        if self._leaving:
                            return
            if self._mid_write:  # `leave`'s deadline passed in the middle of a write
                self._write_torn = True
                self._close("timed out writing")
        finally:
            self._writing = False
            self._drained.set()  # nobody is left to drain it: don't keep aclose waiting

    def leave(self) -> None:
        """The connection's user is done with it (or was cancelled): the
        writer finishes what is queued, within `CLOSE_TIMEOUT`, and ends.

        The reader task is cancelled then; `aclose` does the rest.
        """
        if not self._leaving:
            self._leaving = True
            self._close_deadline = trio.current_time() + CLOSE_TIMEOUT
            self._writer_scope.deadline = self._close_deadline
            self._out_ready.set()

    async def reader(self) -> None:
        self._reading = True
        try:
            if self._received:
                received, self._received = self._received, b""
                self._receive(received)
            # Reads on after we close, until the peer's close frame or EOF.
            while not self._peer_gone.is_set():
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._eof = True
                    self._peer_gone.set()
                    self._close("the peer closed the TCP connection")
                    return
                self._receive(data)
        finally:
            self._reading = False
            self._reader_done.set()

    def _receive(self, data: bytes | bytearray) -> None:
        try:
            events = self._codec.receive(bytes(data))
            error = None
        except _codec.ProtocolError as exc:
            events, error = exc.events, exc  # what came before the bad frame still counts
        for event in events:
            if event[0] == "message":
                if self._closed is None:
                    self._inbox.append(event[1])
                    self._arrived.set()
            elif event[0] == "ping":
                if not self._sent_close:
                    self._queue(self._codec.pong(event[1]))
            elif event[0] == "pong":
                # A pong answers the ping whose payload it echoes, and the
                # pings before that one (a peer may answer only the latest,
                # RFC 6455 5.5.3). A pong echoing none of ours is unsolicited
                # (a heartbeat, 5.5.3): it answers nothing.
                if event[1] in self._pings:
                    for payload in list(self._pings):
                        self._pings.pop(payload).set()
                        if payload == event[1]:
                            break
            else:
                _, code, reason = event
                if not self._sent_close:  # the peer began the close: answer it
                    self._sent_close = True
                    self._queue(self._codec.close(code))
                self._close(f"closed by the peer: {code} {reason}".strip())
                self._peer_gone.set()
                return
        if error is not None:
            if not self._sent_close:
                self._sent_close = True
                self._queue(self._codec.close(error.code, error.reason[:120]))
            self._close(f"protocol error: {error.reason}")
            self._failed = True
            self._peer_gone.set()  # nothing more it says can be trusted

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
            self._arrived.set()
            for pong in self._pings.values():
                pong.set()
            self._pings.clear()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame (unless one was sent, or the peer is
        gone), wait for the peer's, and close the stream. Bounded by
        `CLOSE_TIMEOUT` and shielded from cancellation."""
        initiated = not self._sent_close and not self._peer_gone.is_set()
        if initiated:
            self._sent_close = True
            self._queue(self._codec.close(code, reason or ""))
            self._close("closed by us")
        deadline = min(self._close_deadline, trio.current_time() + CLOSE_TIMEOUT)
        # Bounded and shielded: trio.move_on_at(deadline, shield=True) on
        # Trio 0.27+; spelled out for the older Trio that pyproject allows.
        with (
            trio.CancelScope(deadline=deadline, shield=True),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, _codec.ProtocolError),
        ):
            if self._writing:  # it owns the stream's sending side: let it flush
                await self._drained.wait()
            elif self._out and not self._write_torn:
                data, self._out = bytes(self._out), bytearray()
                await self._stream.send_all(data)
            if not self._write_torn:
                await self._closing_handshake(initiated)
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _closing_handshake(self, initiated: bool) -> None:
        """Our close frame is out: wait for the peer's (if we began the
        close), then, on the client, for the server to close TCP: the server
        closes first (RFC 6455 7.1.1), which spares it the TIME_WAIT."""
        if self._reading:  # the reader reads until the peer's close frame or EOF
            await self._reader_done.wait()
        if self._failed:
            # We failed the connection. Let the peer read our close frame
            # before TCP goes: closing a socket with its data unread resets
            # the connection, which can destroy the frame in flight. So say
            # we are done (EOF) and read what it still sends until it closes.
            if isinstance(self._stream, trio.abc.HalfCloseableStream):
                await self._stream.send_eof()
            elif self._server:  # (TLS) a client waits for the server to close first
                return
            while not self._eof:
                self._eof = not await self._stream.receive_some(65536)
            return
        if not initiated and self._server:
            return
        while not self._eof and (not self._peer_gone.is_set() or not self._server):
            data = await self._stream.receive_some(65536)
            if not data:
                self._eof = True
                self._peer_gone.set()
            elif not self._peer_gone.is_set() and any(
                event[0] == "close" for event in self._codec.receive(bytes(data))
            ):
                self._peer_gone.set()


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
    codec: _Codec
    received = b""
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(hostname, port)
        except OSError as exc:
            raise TransportRejected(_describe(exc)) from None
        try:
            if secure:
                stream = trio.SSLStream(
                    stream, ssl_context or ssl.create_default_context(), server_hostname=hostname
                )
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    raise TransportRejected(_describe(exc)) from None
            if native:
                received = await _native_handshake(stream, host_header, target)
                codec = _codec.FrameCodec(client=True, max_message_size=max_message_size)
            else:
                ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=host_header, target=target)))
                await _await_accept(stream, ws)
                codec = _WsprotoCodec(ws, max_message_size)
        except BaseException:
            with (
                trio.CancelScope(shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.aclose()
            raise
    if scope.cancelled_caught:
        raise TransportRejected("timed out connecting")
    connection = _StreamConnection(stream, codec, received=received)
    try:
        async with _running(connection.reader, connection.writer, leave=connection.leave):
            yield connection
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


async def _native_handshake(stream: trio.abc.Stream, host: str, target: str) -> bytes:
    """Upgrade the connection; return any bytes that came after the server's answer."""
    request, key = _codec.client_request(host, target)
    try:
        await stream.send_all(request)
        head, rest = await _read_head(stream)
        _codec.check_response(head, key)
    except (trio.BrokenResourceError, trio.ClosedResourceError, _codec.HandshakeFailed) as exc:
        raise TransportRejected(_describe(exc)) from None
    return rest


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    buffer = b""
    while True:
        split = _codec.split_head(buffer)
        if split is not None:
            return split
        data = await stream.receive_some(65536)
        if not data:
            raise _codec.HandshakeFailed("the peer closed the connection during the handshake")
        buffer += data


# -- the server end (the reference broker's) --------------------------------------------------


ServerConnection = _StreamConnection


async def serve_websocket(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    max_message_size: int,
    handshake_timeout: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections on (host, port) and run `handler` for
    each, until cancelled. `task_status.started` gets the bound port.

    The same connection and codec as the native client's, so a server's acks
    are coalesced into few writes and read in bursts, too. Any request path
    is accepted.
    """

    async def serve_stream(stream: trio.SocketStream) -> None:
        received = None
        with trio.move_on_after(handshake_timeout):
            received = await _accept_upgrade(stream)
        if received is None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        codec = _codec.FrameCodec(client=False, max_message_size=max_message_size)
        connection = _StreamConnection(stream, codec, server=True, received=received)
        try:
            async with _running(connection.reader, connection.writer, leave=connection.leave):
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


async def _accept_upgrade(stream: trio.abc.Stream) -> bytes | None:
    """Answer the opening handshake: the bytes after it if accepted, else None."""
    try:
        head, rest = await _read_head(stream)
        await stream.send_all(_codec.server_response(head))
    except _codec.HandshakeFailed as exc:
        if exc.response:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(exc.response)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return rest


@asynccontextmanager
async def _running(
    *tasks: Callable[[], Awaitable[None]],
    leave: Callable[[], None] | None = None,
) -> AsyncIterator[None]:
    """Run a connection's background tasks around the caller's body.

    When the body ends (or is cancelled), `leave` is called, then the tasks
    are cancelled (a shielded task ends when `leave` tells it to).

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
                if leave is not None:
                    leave()
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
        try:
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, (RejectConnection, RejectData)):
                    status = getattr(event, "status_code", "?")
                    raise TransportRejected(f"rejected with HTTP {status}")
        except wsproto.utilities.RemoteProtocolError as exc:  # e.g. a wrong accept token
            raise TransportRejected(f"bad handshake answer: {exc}") from None


def _describe(exc: BaseException) -> str:
    """A one-line reason for a failed connection."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"rejected with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "timed out connecting"
    if isinstance(exc, _codec.HandshakeFailed):
        return str(exc)
    cause = exc.__cause__ or exc.__context__
    if not str(exc) and cause is not None:
        return _describe(cause)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
