"""The ``/metrics`` endpoint of ``trio-drain run --metrics HOST:PORT``.

Served on the Trio loop itself, with h11 reading the request and
`prometheus_client` writing the page. Not `prometheus_client`'s own
threaded server: while a drain keeps the Trio thread busy, a scrape served
from another thread waits for the GIL at every step of its request (each
wait up to the interpreter's 5 ms switch interval), which put the p99 of a
scrape at about 100 ms in the benchmark; on the loop it is a task among the
others and answers in a few milliseconds. The page comes from the
collectors' snapshots, so serving it does no I/O but the socket's.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
import trio

from .._errors import ConfigError, TrioDrainError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

#: Longest request head read, and how long a client has to send it.
MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more wait their turn.
MAX_CONNECTIONS = 16


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for an IPv6 address) as (host, port).

    Raises:
        ConfigError: no port, a port out of range, or no host.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{text!r} is not HOST:PORT (say 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, as [::1]:9100")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    on_answered: Callable[[float], None] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` at ``http://host:port/metrics`` until cancelled.

    `nursery.start` returns the address bound (port 0 asks for a free one).
    `on_answered`, if given, is told how long each page took from its
    request read to its answer sent (seconds; the benchmark's).

    Raises:
        TrioDrainError: the address cannot be bound (in use, not ours).
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise TrioDrainError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    bound = listeners[0].socket.getsockname()
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    task_status.started((str(bound[0]), int(bound[1])))
    await trio.serve_listeners(functools.partial(_serve, registry, limiter, on_answered), listeners)


async def _serve(
    registry: CollectorRegistry,
    limiter: trio.CapacityLimiter,
    on_answered: Callable[[float], None] | None,
    stream: trio.SocketStream,
) -> None:
    """One connection: one request, one answer, then close."""
    async with limiter, stream:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                request = await _read_request(conn, stream)
            except h11.RemoteProtocolError:
                await _answer(conn, stream, 400, b"bad request\n")
                return
            except trio.BrokenResourceError:
                return
        if request is None:
            return
        started = time.perf_counter()
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await _respond(registry, conn, stream, request)
            except trio.BrokenResourceError:
                return
        if on_answered is not None:
            on_answered(time.perf_counter() - started)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            return event
        else:  # the client closed first
            return None


async def _respond(
    registry: CollectorRegistry, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request
) -> None:
    from prometheus_client.exposition import choose_encoder

    if request.method not in (b"GET", b"HEAD"):
        await _answer(conn, stream, 405, b"only GET\n", [(b"allow", b"GET, HEAD")])
        return
    if request.target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
        await _answer(conn, stream, 404, b"the metrics are at /metrics\n")
        return
    accept = b", ".join(value for name, value in request.headers if name == b"accept")
    encoder, content_type = choose_encoder(accept.decode("latin-1"))
    body = encoder(registry)
    await _answer(
        conn,
        stream,
        200,
        body if request.method == b"GET" else b"",
        [(b"content-type", content_type.encode())],
        length=len(body),
    )


async def _answer(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    length: int | None = None,
) -> None:
    if conn.our_state is not h11.IDLE and conn.our_state is not h11.SEND_RESPONSE:
        return
    head = [
        *(headers or [(b"content-type", b"text/plain; charset=utf-8")]),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"connection", b"close"),
    ]
    try:
        data = conn.send(h11.Response(status_code=status, headers=head)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:  # past answering (a request too broken to answer)
        return
    await stream.send_all(data)
