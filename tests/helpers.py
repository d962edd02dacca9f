"""Test doubles and waits shared across the suite: a fake clock, a fake broker,
a portal into Trio, a worker rig, waits on a condition or on rows settling."""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio_websocket

from trio_drain import (
    BrokerRegistry,
    BrokerServer,
    BrokerUnavailable,
    DrainConfig,
    DrainWorker,
    Outbox,
    OutgoingMessage,
    SendResult,
    StoreUnavailable,
    serve_broker,
)

T = TypeVar("T")


@attrs.define
class FakeClock:
    """Wall-clock milliseconds that only move when a test says so."""

    now: int = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


Script = Callable[[OutgoingMessage], "SendResult | Exception | None"]


class FakeBroker:
    """An in-memory broker that dedupes on client_message_id like the real one.

    `script` may return a SendResult to answer with, an exception to raise,
    or None for the default (ack, or duplicate ack for a seen id).
    """

    def __init__(self, *, is_open: bool = True, delay: float = 0.0, script: Script | None = None) -> None:
        self._open = is_open
        self.delay = delay
        self.script = script
        self.received: list[OutgoingMessage] = []
        self.accepted: dict[str, str] = {}  # client_message_id -> broker message id
        self.concurrent = 0
        self.max_concurrent = 0
        self.arrivals: list[float] = []  # trio.current_time() when each send arrived
        self._listeners: list[Callable[[], None]] = []

    def is_open(self) -> bool:
        return self._open

    def set_open(self, value: bool) -> None:
        self._open = value
        if value:
            for callback in self._listeners:
                callback()

    def add_open_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_open_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    async def send(self, message: OutgoingMessage) -> SendResult:
        if not self._open:
            raise BrokerUnavailable("fake broker is closed")
        self.received.append(message)
        self.arrivals.append(trio.current_time())
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.delay:
                await trio.sleep(self.delay)
            answer = self.script(message) if self.script is not None else None
            if isinstance(answer, Exception):
                raise answer
            if answer is not None:
                if answer.ok:
                    self.accepted.setdefault(message.client_message_id, answer.message_id or "")
                return answer
            cmid = message.client_message_id
            if cmid in self.accepted:
                return SendResult.acked(self.accepted[cmid], duplicate=True)
            self.accepted[cmid] = f"b-{len(self.accepted)}"
            return SendResult.acked(self.accepted[cmid])
        finally:
            self.concurrent -= 1


class TrioPortal:
    """A Trio loop on a background thread, callable from synchronous code.

    Hypothesis rules are synchronous; they reach async code through this.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await self._stop.wait()

    def __enter__(self) -> TrioPortal:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], *, seconds: float = 10.0) -> None:
    """Poll `predicate` (plain or async) until it holds; fail after `seconds`.

    Polling (not an Event) because the state watched is often in the database.
    """
    with trio.fail_after(seconds):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.005)


#: The statuses a row ends in.
ENDED = ("done", "dead", "aborted")


async def wait_settled(
    outbox: Outbox,
    n: int,
    *,
    among: Iterable[str] = ENDED,
    seconds: float = 10.0,
    through_outages: bool = False,
) -> dict[str, int]:
    """Wait until at least `n` rows are in the statuses `among` (by default
    done, dead or aborted); return the counts.

    With `through_outages`, a store that cannot answer means not yet, for
    tests that take the store away under a worker.
    """
    statuses = tuple(among)

    async def settled() -> bool:
        try:
            counts = await outbox.counts()
        except StoreUnavailable:
            if through_outages:
                return False
            raise
        return sum(counts[s] for s in statuses) >= n

    await wait_until(settled, seconds=seconds)
    return await outbox.counts()


async def start_server(nursery: trio.Nursery, **options: Any) -> BrokerServer:
    """The reference broker, serving on loopback in `nursery` once this
    returns; `options` are `serve_broker`'s."""
    server: BrokerServer = await nursery.start(functools.partial(serve_broker, **options))
    return server


@asynccontextmanager
async def websocket_client(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's client, for talking to our broker as a third party would.

    trio-websocket's client leaves its socket open when the server closed
    the WebSocket first (it waits for a TCP close it then never reads), so
    this closes it itself, as the library's trio-websocket transport does.
    """
    stream: trio.abc.AsyncResource | None = None
    try:
        async with trio_websocket.open_websocket_url(url) as ws:
            stream = ws._stream
            yield ws
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


#: A worker config that retries and times out fast, for tests over real
#: brokers on loopback.
QUICK_RETRIES = DrainConfig(
    poll_interval=0.05,
    backoff_base=0.01,
    backoff_cap=0.05,
    route_retry=0.02,
    lease=5.0,
    ack_timeout=1.0,
    maintenance_interval=0.2,
)


@attrs.define
class Rig:
    """What a worker runs in: an outbox, a registry that sends mesh `mesh`'s
    rows to `broker` (a FakeBroker unless the test brings its own), and a
    nursery to run workers in, with `config` unless told otherwise."""

    outbox: Outbox
    nursery: trio.Nursery
    broker: Any = attrs.field(factory=FakeBroker)
    config: DrainConfig = QUICK_RETRIES
    mesh: str = "alpha"
    registry: BrokerRegistry = attrs.field(init=False, factory=BrokerRegistry)

    def __attrs_post_init__(self) -> None:
        self.registry.set_mesh(self.mesh, self.broker)

    def worker(self, config: DrainConfig | None = None) -> DrainWorker:
        """A worker over the rig's outbox and registry, not started."""
        return DrainWorker(self.outbox, self.registry, self.config if config is None else config)

    async def start(self, config: DrainConfig | None = None) -> DrainWorker:
        """A worker started in the rig's nursery."""
        worker = self.worker(config)
        await self.nursery.start(worker.run)
        return worker

    async def settled(self, n: int, **kw: Any) -> dict[str, int]:
        """`wait_settled` on the rig's outbox."""
        return await wait_settled(self.outbox, n, **kw)


def self_signed_certificate(folder: Path, *, ip: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate (for `ip`, if given) and its key, made with
    openssl; skips the test where openssl is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for a wss:// test")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", f"/CN={ip or 'x'}", *(["-addext", f"subjectAltName=IP:{ip}"] if ip else [])]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
