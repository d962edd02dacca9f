"""The seam between a broker and a WebSocket: what a connection can do, and how it fails.

`WebSocketBroker` needs little of a WebSocket: connect, send a text frame,
read the messages that arrived, ping and wait for the pong, close. Three
transports provide it (`TRANSPORTS`):

- ``"native"`` (the default): our own connection on a Trio stream
  (`_engine`) with our RFC 6455 codec (`_codec`). Frames queued while a
  write is in progress go out together in one ``send_all``, so a pipelined
  burst of sends costs one system call, and a burst of acks is parsed in one
  pass.
- ``"wsproto"``: the same connection with wsproto as the codec (`_wsproto`).
- ``"trio-websocket"``: the trio-websocket library (`_trio_websocket`).

Whatever the transport, a failure reaches the broker as one of two errors,
`TransportClosed` or `TransportRejected`, with a one-line reason
(`describe`): foreign exceptions are translated here, at the boundary.
"""

from __future__ import annotations

from typing import Literal, Protocol

import trio_websocket

from ._handshake import HandshakeFailed

TransportName = Literal["native", "wsproto", "trio-websocket"]
TRANSPORTS: tuple[TransportName, ...] = ("native", "wsproto", "trio-websocket")


class TransportClosed(Exception):
    """The connection is closed (by either side, or because the stream broke)."""


class TransportRejected(Exception):
    """The server refused the WebSocket handshake, or the connection failed."""


class Connection(Protocol):
    """One open WebSocket connection, as a broker uses it (any transport)."""

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


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed connection."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"rejected with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "timed out connecting"
    if isinstance(exc, HandshakeFailed):
        return str(exc)
    cause = exc.__cause__ or exc.__context__
    if not str(exc) and cause is not None:
        return describe(cause)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
