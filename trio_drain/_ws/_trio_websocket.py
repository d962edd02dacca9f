"""The trio-websocket library behind our `Connection` seam: the ``"trio-websocket"`` transport."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio_websocket

from ._connection import Connection, TransportClosed, TransportRejected, describe
from ._engine import running


class _TrioWebsocketConnection:
    """A trio-websocket connection as a `Connection`, its errors translated."""

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
async def open_trio_websocket(
    url: str, ssl_context: ssl.SSLContext | None, max_message_size: int, connect_timeout: float
) -> AsyncIterator[Connection]:
    """Connect with trio-websocket; a failure to connect is `TransportRejected`."""
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
            async with running(connection.writer):
                yield connection
            body_done = True
    except (OSError, trio_websocket.HandshakeError) as exc:
        if body_done:
            return  # the close handshake failed (e.g. DisconnectionTimeout): we are leaving anyway
        if entered:
            raise
        raise TransportRejected(describe(exc)) from None
    except Exception as exc:
        if entered:
            raise
        # trio-websocket lets other errors out of a handshake that went wrong
        # (h11's, for a malformed or mismatched answer): still a refusal.
        raise TransportRejected(f"handshake failed: {describe(exc)}") from None
    finally:
        # trio-websocket's client waits for the server to close TCP and can
        # leave its socket open when the peer vanished; close it ourselves.
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
