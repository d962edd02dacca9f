"""The server end: `serve_websocket` accepts upgrades and runs a handler per connection.

The reference broker serves with it. Each connection is the same engine
and codec as the native client's (`_engine.StreamConnection` with
`_codec.FrameCodec`), so a server's acks are coalesced into few writes and
read in bursts too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from . import _codec, _handshake
from ._connection import TransportClosed
from ._engine import StreamConnection, read_head, running

log = logging.getLogger("trio_drain.transport")

#: The connection a `serve_websocket` handler is given.
ServerConnection = StreamConnection


async def serve_websocket(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    max_message_size: int,
    handshake_timeout: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections on (host, port) and run `handler` for each, until cancelled.

    Any request path is accepted. A handler's failure is logged and ends
    only its own connection.

    Args:
        handler: called with each connection once its upgrade is accepted;
            the connection is closed when it returns.
        host: the address to listen on.
        port: the port to listen on (0 for any free one).
        max_message_size: longest message accepted from a client.
        handshake_timeout: seconds a client has to complete its upgrade.
        task_status: `started` with the bound port.
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
        connection = StreamConnection(stream, codec, server=True, received=received)
        try:
            async with running(connection.reader, connection.writer, leave=connection.leave):
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
        head, rest = await read_head(stream)
        await stream.send_all(_handshake.server_response(head))
    except _handshake.HandshakeFailed as exc:
        if exc.response:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(exc.response)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return rest
