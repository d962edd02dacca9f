"""WebSocketBroker: one long-lived connection to a broker, reconnecting forever.

Run it in a nursery (``await nursery.start(broker.run)``). It connects,
sends the signed hello, waits up to 5 s for ``hello_ack``, then reads
frames continuously, matching acks to outstanding sends by id. Pings go out
every `ping_interval`; a pong missing for `pong_timeout` means a dead
(half-open) connection, which is dropped and redialled. Every outstanding
send on a connection that closes fails as transient `broker_disconnected`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import trio

from .._clock import wall_clock_ms
from .._display import Throttle, bounded, quieted
from .._errors import BrokerUnavailable, ConfigError, HandshakeError
from .._ws import (
    TRANSPORTS,
    Connection,
    TransportClosed,
    TransportName,
    TransportRejected,
    open_connection,
)
from ._identity import Identity, MeshIdentity
from ._registry import SendHandle
from ._wire import MAX_FRAME, OutgoingMessage, SendResult, classify_ack, parse_frame

log = logging.getLogger("trio_drain.broker")

RECONNECT_BACKOFF: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HELLO_TIMEOUT = 5.0
ACK_TIMEOUT = 15.0


class _Waiter:
    """One send awaiting its ack: wakes a task (`send`) or calls back (`start_send`).

    It is also the `SendHandle` that `start_send` returns.
    """

    __slots__ = ("broker", "callback", "deadline", "event", "key", "result")

    def __init__(
        self,
        broker: WebSocketBroker,
        key: str,
        deadline: float,
        callback: Callable[[SendResult], None] | None = None,
    ) -> None:
        self.broker = broker
        self.key = key
        self.deadline = deadline
        self.callback = callback
        self.event = trio.Event() if callback is None else None
        self.result: SendResult | None = None

    def resolve(self, result: SendResult) -> None:
        if self.result is not None:
            return
        self.result = result
        self.broker._forget(self)
        if self.event is not None:
            self.event.set()
        elif self.callback is not None:
            try:
                self.callback(result)
            except Exception:  # the reader must survive a caller's bug
                log.exception("send result callback failed for %s", self.key)

    def cancel(self) -> None:
        """Stop waiting: the callback will not be called."""
        self.callback = None
        self.broker._forget(self)


class WebSocketBroker:
    """A broker connection, mesh (`MeshIdentity`) or session (`SessionIdentity`).

    Args:
        url: ``ws://`` or ``wss://`` (certificates verified by default).
        identity: who to say we are in the hello.
        on_push: called with every frame that is not an ack or hello answer.
        ssl_context: for ``wss://``; default is the system's verifying context.
        ping_interval: seconds between keepalive pings.
        pong_timeout: seconds a pong may take before the connection is dead.
        ack_timeout: seconds an ack may take before a send fails `ack_timeout`.
        reconnect_backoff: delays between connection attempts (jittered ±20%).
        transport: ``"native"`` (default: our own RFC 6455 codec on a Trio
            stream, writes coalesced), ``"wsproto"`` (the same with wsproto
            as the codec) or ``"trio-websocket"``.
    """

    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        on_push: Callable[[dict[str, Any]], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float = 5.0,
        pong_timeout: float = 5.0,
        hello_timeout: float = HELLO_TIMEOUT,
        ack_timeout: float = ACK_TIMEOUT,
        reconnect_backoff: Sequence[float] = RECONNECT_BACKOFF,
        clock: Callable[[], int] | None = None,
        transport: TransportName = "native",
    ) -> None:
        check_broker_url(url)
        if transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
        self.url = url
        self.transport = transport
        self.identity = identity
        self.on_push = on_push
        self.ssl_context = ssl_context
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.hello_timeout = hello_timeout
        self.ack_timeout = ack_timeout
        self.reconnect_backoff = tuple(reconnect_backoff)
        self._clock = clock or wall_clock_ms
        self._ws: Connection | None = None
        self._open = False
        self._pending: dict[str, list[_Waiter]] = {}
        self._listeners: list[Callable[[], None]] = []
        self.connects = 0
        self.last_error: str | None = None
        #: Why the last attempt failed, when retrying cannot mend it: the
        #: broker refused our hello, or its TLS certificate failed
        #: verification. None after a success or an ordinary failure.
        self.fatal_error: str | None = None
        self._throttle = Throttle()
        self.presence_id: str | None = None

    def __repr__(self) -> str:
        kind = "mesh" if isinstance(self.identity, MeshIdentity) else "session"
        return f"<WebSocketBroker {kind} {self.url} {'open' if self._open else 'closed'}>"

    @property
    def rate_limit_key(self) -> tuple[str, str]:
        """Who a broker's rate limit counts against: the member (a session
        counts against its parent), so the worker paces them together."""
        identity = self.identity
        if isinstance(identity, MeshIdentity):
            return (identity.mesh_id, identity.member_id)
        return (identity.mesh_id, identity.parent_member_id)

    # -- the Broker protocol

    def is_open(self) -> bool:
        """Whether the hello was acknowledged and the socket is still up."""
        return self._open

    def add_open_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time a connection's hello is acknowledged."""
        self._listeners.append(callback)

    def remove_open_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling `callback` (a no-op if it was not added)."""
        for i, known in enumerate(self._listeners):
            if known == callback:
                del self._listeners[i]
                return

    async def send(self, message: OutgoingMessage) -> SendResult:
        """Send one message and wait for its ack.

        Raises:
            BrokerUnavailable: the connection is not open; nothing was sent.
        """
        ws = self._ws
        if not self._open or ws is None:
            raise BrokerUnavailable(f"broker connection to {self.url} is not open")
        waiter = self._expect(message.client_message_id, None)
        try:
            try:
                await ws.send_message(message.to_json())
            except TransportClosed:
                raise BrokerUnavailable(f"broker connection to {self.url} closed") from None
            assert waiter.event is not None
            await waiter.event.wait()
            assert waiter.result is not None
            return waiter.result
        finally:
            self._forget(waiter)

    def start_send(self, message: OutgoingMessage, on_result: Callable[[SendResult], None]) -> SendHandle:
        """Queue one message and return at once; `on_result(result)` follows the ack.

        The ack deadline (`ack_timeout`) and a lost connection
        (`broker_disconnected`) are reported through `on_result` too. See
        `PipelinedBroker`.

        Raises:
            BrokerUnavailable: the connection is not open; nothing was queued.
        """
        ws = self._ws
        if not self._open or ws is None:
            raise BrokerUnavailable(f"broker connection to {self.url} is not open")
        try:
            ws.send_message_nowait(message.to_json())
        except TransportClosed:
            raise BrokerUnavailable(f"broker connection to {self.url} closed") from None
        return self._expect(message.client_message_id, on_result)

    def _expect(self, key: str, callback: Callable[[SendResult], None] | None) -> _Waiter:
        # The ack deadline is enforced by one sweeper per connection rather
        # than a cancel scope per send: this is the hot path.
        waiter = _Waiter(self, key, trio.current_time() + self.ack_timeout, callback)
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [waiter]
        else:
            waiters.append(waiter)
        return waiter

    def _forget(self, waiter: _Waiter) -> None:
        waiters = self._pending.get(waiter.key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._pending[waiter.key]

    # -- the connection

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and stay connected until cancelled.

        `nursery.start` returns after the first attempt, successful or not
        (`is_open()` tells which); the connection is retried forever.
        """
        attempt = 0
        started = False

        def opened() -> None:
            nonlocal started, attempt
            attempt = 0
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._connect_once(opened)
            except HandshakeError as exc:
                self.last_error = f"hello refused: {exc}"
                self.fatal_error = self.last_error if exc.refused else None
                # The first attempt's outcome is the caller's to report
                # (nursery.start returns with is_open() False).
                log.log(
                    logging.WARNING if started else logging.INFO, "broker %s: %s", self.url, self.last_error
                )
            except (TransportRejected, TransportClosed, OSError, trio.BrokenResourceError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                self.fatal_error = (
                    f"TLS certificate verification failed: {self.last_error}"
                    if _CERTIFICATE_FAILED.search(self.last_error)
                    else None
                )
                log.log(
                    logging.WARNING if started else logging.INFO,
                    "broker %s: connection failed: %s",
                    self.url,
                    self.last_error,
                )
            finally:
                self._closed()
            if not started:
                task_status.started()
                started = True
            delay = self.reconnect_backoff[min(attempt, len(self.reconnect_backoff) - 1)]
            attempt += 1
            await trio.sleep(delay * random.uniform(0.8, 1.2))

    async def _connect_once(self, opened: Callable[[], None]) -> None:
        ssl_arg: ssl.SSLContext | None = self.ssl_context
        if self.url.startswith("wss://") and ssl_arg is None:
            ssl_arg = ssl.create_default_context()  # verifies certificates
        async with open_connection(
            self.url,
            transport=self.transport,
            ssl_context=ssl_arg,
            max_message_size=MAX_FRAME,
            connect_timeout=self.hello_timeout,
        ) as ws:
            await self._hello(ws)
            self._ws = ws
            self._open = True
            self.connects += 1
            self.last_error = self.fatal_error = None
            log.info("broker %s: connected (presence %s)", self.url, self.presence_id)
            opened()
            for callback in list(self._listeners):
                callback()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive, ws, nursery.cancel_scope)
                    nursery.start_soon(self._expire_acks)
                    await self._read_frames(ws)
                    nursery.cancel_scope.cancel()
            finally:
                self._closed()  # at once, not after the close handshake

    async def _hello(self, ws: Connection) -> None:
        await ws.send_message(json.dumps(self.identity.hello(self._clock())))
        with trio.move_on_after(self.hello_timeout):
            while True:
                frame = parse_frame(await ws.get_message())
                if frame is None:
                    continue
                if frame.get("type") == "hello_ack":
                    self.presence_id = bounded(str(frame.get("presenceId", "")), 80)
                    return
                if frame.get("type") == "error":
                    code, message = (
                        bounded(str(frame.get("code", "error")), 64),
                        bounded(str(frame.get("message", "")), 300),
                    )
                    raise HandshakeError(f"{code}: {message}", refused=True)
                self._push(frame)
        raise HandshakeError(f"no hello_ack within {self.hello_timeout}s")

    async def _read_frames(self, ws: Connection) -> None:
        while True:
            try:
                batch = await ws.get_messages()
            except TransportClosed as exc:
                log.warning("broker %s: connection closed: %s", self.url, exc)
                return
            for raw in batch:
                self._on_frame(raw)

    def _on_frame(self, raw: str | bytes) -> None:
        frame = parse_frame(raw)
        if frame is None:
            quiet = self._throttle("garbage")
            if quiet is not None:
                log.warning(
                    "broker %s sent a frame that is not a JSON object; ignored%s", self.url, quieted(quiet)
                )
            return
        kind = frame.get("type")
        if kind == "ack":
            waiters = self._pending.get(str(frame.get("id")))
            if not waiters:
                quiet = self._throttle("unknown ack")
                if quiet is not None:
                    log.info(
                        "broker %s acked an id we are not waiting for: %s%s",
                        self.url,
                        bounded(str(frame.get("id")), 80),
                        quieted(quiet),
                    )
                return
            result = classify_ack(frame)
            for waiter in list(waiters):  # resolving one removes it
                waiter.resolve(result)
        elif kind == "error":
            quiet = self._throttle("error frame")
            if quiet is not None:
                log.warning(
                    "broker %s error: %s %s%s",
                    self.url,
                    bounded(str(frame.get("code")), 64),
                    bounded(str(frame.get("message")), 300),
                    quieted(quiet),
                )
        else:
            self._push(frame)

    async def _keepalive(self, ws: Connection, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            with trio.move_on_after(self.pong_timeout) as ping_scope:
                try:
                    await ws.ping()
                except TransportClosed:
                    return
            if ping_scope.cancelled_caught:
                log.warning(
                    "broker %s: no pong within %ss; dropping the connection", self.url, self.pong_timeout
                )
                scope.cancel()
                return

    async def _expire_acks(self) -> None:
        """Fail sends whose ack is overdue, as transient `ack_timeout`."""
        timeout = SendResult.no_answer("ack_timeout")
        while True:
            await trio.sleep(min(1.0, self.ack_timeout / 4))
            now = trio.current_time()
            for waiters in list(self._pending.values()):
                for waiter in list(waiters):  # resolving one removes it
                    if waiter.deadline <= now:
                        waiter.resolve(timeout)

    def _push(self, frame: dict[str, Any]) -> None:
        if self.on_push is None:
            return
        try:
            self.on_push(frame)
        except Exception:
            log.exception("on_push callback failed")

    def _closed(self) -> None:
        was_open = self._open
        self._open = False
        self._ws = None
        failure = SendResult.no_answer("broker_disconnected")
        for waiters in list(self._pending.values()):
            for waiter in list(waiters):  # resolving one removes it
                waiter.resolve(failure)
        stopping = trio.current_effective_deadline() == float("-inf")
        if was_open and not stopping:
            log.warning("broker %s: disconnected", self.url)


_CERTIFICATE_FAILED = re.compile(r"certificate verify failed|CERTIFICATE_VERIFY_FAILED", re.I)


def check_broker_url(url: object) -> None:
    """Refuse a broker URL no connection attempt could use.

    Raises:
        ConfigError: not a string, not ws:// or wss://, no host, or a port
            outside 1-65535.
    """
    if not isinstance(url, str):
        raise ConfigError(f"broker URL must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"broker URL {url!r} must start with ws:// or wss://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    if port == 0:
        raise ConfigError(f"broker URL {url!r}: port must be between 1 and 65535")
