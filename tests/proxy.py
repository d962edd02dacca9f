"""A loopback TCP proxy that injects network faults between client and server."""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class FaultProxy:
    """Forwards 127.0.0.1:<port> to `target_port`, with faults on demand.

    Attributes:
        blackhole: stop forwarding in both directions but keep the sockets
            open: a half-open connection, as after a cable pull.
        latency: seconds added to every chunk forwarded.
        cut_next: the next chunk from the server is cut: its first half is
            forwarded, then the connection is dropped (a frame cut in the
            middle). Cleared once used.
        slow_close: seconds a closing side's end-of-stream takes to reach
            the other side (a peer that closes slowly).
    """

    target_port: int
    port: int = 0
    blackhole: bool = False
    latency: float = 0.0
    cut_next: bool = False
    slow_close: float = 0.0
    cuts: int = 0
    _connections: list[trio.Nursery] = attrs.field(factory=list)

    async def run(self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def reset_all(self) -> None:
        """Drop every proxied connection at once."""
        for nursery in self._connections:
            nursery.cancel_scope.cancel()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                self._connections.append(nursery)
                nursery.start_soon(self._pump, client, server, nursery, False)
                nursery.start_soon(self._pump, server, client, nursery, True)
            self._connections.remove(nursery)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, connection: trio.Nursery, from_server: bool
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    if self.slow_close:
                        await trio.sleep(self.slow_close)
                    await sink.send_eof()
                    return
                if self.latency:
                    await trio.sleep(self.latency)
                if self.blackhole:
                    continue  # swallowed: nobody hears anything
                if from_server and self.cut_next and len(data) > 1:
                    self.cut_next = False
                    self.cuts += 1
                    await sink.send_all(data[: len(data) // 2])
                    connection.cancel_scope.cancel()
                    return
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
