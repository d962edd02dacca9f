"""wsproto as the codec of our connection engine: the ``"wsproto"`` transport.

Its opening handshake (`handshake`) and its events turned into ours
(`WsprotoCodec`), so `_engine.StreamConnection` runs over wsproto just as
over `_codec.FrameCodec`: the two codecs answer for each other in the
conformance tests.
"""

from __future__ import annotations

import trio
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

from . import _codec
from ._connection import TransportRejected, describe


async def handshake(stream: trio.abc.Stream, host: str, target: str, max_message_size: int) -> WsprotoCodec:
    """Upgrade the connection with wsproto; its codec for what follows.

    Raises:
        TransportRejected: the server refused, or answered wrongly.
    """
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target=target)))
    await _await_accept(stream, ws)
    return WsprotoCodec(ws, max_message_size)


class WsprotoCodec:
    """wsproto's connection (after its handshake) as an `_engine.Codec`."""

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


async def _await_accept(stream: trio.abc.Stream, ws: wsproto.WSConnection) -> None:
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportRejected(describe(exc)) from None
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
