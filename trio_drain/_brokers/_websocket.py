"""WebSocketBroker: one long-lived connection to a broker, reconnecting forever.

Run it in a nursery (``await nursery.start(broker.run)``). It connects,
sends the signed hello, waits up to 5 s for ``hello_ack``, then reads
frames continuously, matching acks to outstanding sends by id (`_pending`).
Pings go out every `ping_interval`; a pong missing for `pong_timeout` means
a dead (half-open) connection, which is dropped and redialled. Every
outstanding send on a connection that closes fails as transient
`broker_disconnected`. What the frames look like is `_wire`'s.
"""

from __future__ import annotations

import json
import logging
import random
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import attrs
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
from ._pending import PendingAcks, Waiter
from ._registry import SendHandle
from ._statistics import Counters, WebSocketBrokerStatistics
from ._url import check_broker_url
from ._wire import MAX_FRAME, OutgoingMessage, SendResult, classify_ack, hello_answer, parse_frame

log = logging.getLogger("trio_drain.broker")

RECONNECT_BACKOFF: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HELLO_TIMEOUT = 5.0
ACK_TIMEOUT = 15.0


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
        self._pending = PendingAcks()
        self._listeners: list[Callable[[], None]] = []
        self.connects = 0
        self._counts = Counters()
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

    def statistics(self) -> WebSocketBrokerStatistics:
        """A frozen snapshot of the connection's counters."""
        return WebSocketBrokerStatistics(
            is_open=self._open,
            connects=self.connects,
            in_flight=len(self._pending),
            **attrs.asdict(self._counts),
        )

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
        ws = self._open_connection()
        waiter = self._expect(message.client_message_id, None)
        try:
            try:
                await ws.send_message(message.to_json())
            except TransportClosed:
                raise BrokerUnavailable(f"broker connection to {self.url} closed") from None
            self._counts.frames_sent += 1
            assert waiter.event is not None
            await waiter.event.wait()
            assert waiter.result is not None
            return waiter.result
        finally:
            self._pending.forget(waiter)

    def start_send(self, message: OutgoingMessage, on_result: Callable[[SendResult], None]) -> SendHandle:
        """Queue one message and return at once; `on_result(result)` follows the ack.

        The ack deadline (`ack_timeout`) and a lost connection
        (`broker_disconnected`) are reported through `on_result` too. See
        `PipelinedBroker`.

        Raises:
            BrokerUnavailable: the connection is not open; nothing was queued.
        """
        # The hot path: `_open_connection` and `_expect` written out.
        ws = self._ws
        if not self._open or ws is None:
            raise BrokerUnavailable(f"broker connection to {self.url} is not open")
        try:
            ws.send_message_nowait(message.to_json())
        except TransportClosed:
            raise BrokerUnavailable(f"broker connection to {self.url} closed") from None
        self._counts.frames_sent += 1
        return self._pending.expect(
            message.client_message_id, trio.current_time() + self.ack_timeout, on_result
        )

    def _open_connection(self) -> Connection:
        ws = self._ws
        if not self._open or ws is None:
            raise BrokerUnavailable(f"broker connection to {self.url} is not open")
        return ws

    def _expect(self, key: str, callback: Callable[[SendResult], None] | None) -> Waiter:
        # The ack deadline is enforced by one sweeper per connection rather
        # than a cancel scope per send: this is the hot path.
        return self._pending.expect(key, trio.current_time() + self.ack_timeout, callback)

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
            except _ATTEMPT_FAILED as exc:
                self.last_error, self.fatal_error, why = _why_failed(exc)
                # The first attempt's outcome is the caller's to report
                # (nursery.start returns with is_open() False).
                log.log(logging.WARNING if started else logging.INFO, "broker %s: %s", self.url, why)
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
                answer = hello_answer(frame)
                if answer is None:
                    self._push(frame)
                elif answer[0] == "accepted":
                    self.presence_id = answer[1]
                    return
                else:
                    raise HandshakeError(answer[1], refused=True)
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
            self._log_throttled("garbage", logging.WARNING, "sent a frame that is not a JSON object; ignored")
            return
        kind = frame.get("type")
        if kind == "ack":
            if self._pending.resolve(str(frame.get("id")), classify_ack(frame)):
                self._counts.acks_received += 1
            else:
                self._counts.unknown_acks += 1
                id_ = bounded(str(frame.get("id")), 80)
                self._log_throttled(
                    "unknown ack", logging.INFO, "acked an id we are not waiting for: %s", id_
                )
        elif kind == "error":
            self._counts.errors_received += 1
            code, message = bounded(str(frame.get("code")), 64), bounded(str(frame.get("message")), 300)
            self._log_throttled("error frame", logging.WARNING, "error: %s %s", code, message)
        else:
            self._push(frame)

    def _log_throttled(self, what: str, level: int, message: str, *args: object) -> None:
        # A broker that keeps sending nonsense must not flood the log.
        quiet = self._throttle(what)
        if quiet is not None:
            log.log(level, "broker %s " + message + "%s", self.url, *args, quieted(quiet))

    async def _keepalive(self, ws: Connection, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            with trio.move_on_after(self.pong_timeout) as ping_scope:
                try:
                    await ws.ping()
                except TransportClosed:
                    return
            if ping_scope.cancelled_caught:
                self._counts.pongs_missed += 1
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
            self._counts.ack_timeouts += self._pending.expire(trio.current_time(), timeout)

    def _push(self, frame: dict[str, Any]) -> None:
        self._counts.pushes_received += 1
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
        if was_open:
            self._counts.disconnects += 1
        self._pending.fail_all(SendResult.no_answer("broker_disconnected"))
        stopping = trio.current_effective_deadline() == float("-inf")
        if was_open and not stopping:
            log.warning("broker %s: disconnected", self.url)


#: What a failed connection attempt raises; `run` retries after each.
_ATTEMPT_FAILED = (HandshakeError, TransportRejected, TransportClosed, OSError, trio.BrokenResourceError)
_CERTIFICATE_FAILED = re.compile(r"certificate verify failed|CERTIFICATE_VERIFY_FAILED", re.I)


def _why_failed(exc: BaseException) -> tuple[str, str | None, str]:
    """A failed attempt's last_error, its fatal_error (None if retrying may
    mend it: only a refused hello and a failed certificate cannot), and the
    line to log."""
    if isinstance(exc, HandshakeError):
        error = f"hello refused: {exc}"
        return error, (error if exc.refused else None), error
    error = str(exc) or type(exc).__name__
    fatal = f"TLS certificate verification failed: {error}" if _CERTIFICATE_FAILED.search(error) else None
    return error, fatal, f"connection failed: {error}"
