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
    """

    target_port: int
    port: int = 0
    blackhole: bool = False
    latency: float = 0.0
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
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)
            self._connections.remove(nursery)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    await sink.send_eof()
                    return
                if self.latency:
                    await trio.sleep(self.latency)
                if self.blackhole:
                    continue  # swallowed: nobody hears anything
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
