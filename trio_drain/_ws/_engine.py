"""The connection engine: one WebSocket (client or server end) over a Trio stream.

`StreamConnection` does the I/O and the closing handshake around a codec
that does the protocol (`Codec`: ours in `_codec`, or wsproto's behind
`_wsproto.WsprotoCodec`). `running` runs its reader and writer tasks around
the user's body, and `read_head` reads an opening handshake's head off the
stream for `_client` and `_server`.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from .. import _crashpoints
from . import _codec, _handshake
from ._connection import TransportClosed

#: Seconds the closing handshake may take (the native connection's, client
#: and server) before TCP is closed regardless.
CLOSE_TIMEOUT = 1.0


class Codec(Protocol):
    """Frames out, events in: `_codec.FrameCodec`, or wsproto behind `_wsproto.WsprotoCodec`."""

    def text(self, message: str) -> bytes: ...

    def ping(self, payload: bytes) -> bytes: ...

    def pong(self, payload: bytes) -> bytes: ...

    def close(self, code: int, reason: str = "") -> bytes: ...

    def receive(self, data: bytes) -> list[_codec.Event]: ...


class StreamConnection:
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
        codec: Codec,
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
        """The writer task: send what was queued, in one write per wake-up."""
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
        """The reader task: parse what arrives until the peer is done talking."""
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


@asynccontextmanager
async def running(
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


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The head of an opening handshake (request or response), and the bytes after it.

    Raises:
        HandshakeFailed: the peer closed the connection first, or the head is too long.
    """
    buffer = b""
    while True:
        split = _handshake.split_head(buffer)
        if split is not None:
            return split
        data = await stream.receive_some(65536)
        if not data:
            raise _handshake.HandshakeFailed("the peer closed the connection during the handshake")
        buffer += data
