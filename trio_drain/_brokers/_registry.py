"""Brokers as the worker sees them, the registry, and the routing rules.

A row goes out through exactly one broker connection, chosen in this order
(section 4 of the spec):

1. `sender_session_pubkey` set: that session's connection, if registered
   and open; otherwise the route is unavailable. Never the mesh socket: the
   row was encrypted with the session's key.
2. `mesh` set: that mesh's connection; not open is unavailable, not
   registered is dead (`no_broker_for_mesh:<mesh>`).
3. `mesh` null: the only registered mesh broker, else dead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs

from .._model import OutboxRow
from ._wire import OutgoingMessage, SendResult

_HEX64 = re.compile(r"[0-9a-f]{64}")


@runtime_checkable
class Broker(Protocol):
    """What the drain worker needs of a broker connection.

    `send` writes one message and waits for the broker's answer. It raises
    `BrokerUnavailable` if nothing could be written (the socket is not open);
    once the frame may have left it must answer with a `SendResult` (a lost
    connection is the transient failure `broker_disconnected`). The worker
    bounds each send with its own ack timeout.

    A broker may also offer `add_open_listener(callback)` (and
    `remove_open_listener(callback)`): the registry then wakes the worker
    whenever that broker's connection (re)opens, until it is removed; and
    `start_send` (see `PipelinedBroker`), which the worker prefers.
    """

    def is_open(self) -> bool: ...

    async def send(self, message: OutgoingMessage) -> SendResult: ...


class SendHandle(Protocol):
    """A send started with `PipelinedBroker.start_send`."""

    def cancel(self) -> None:
        """Stop waiting for the answer: the callback will not be called."""


@runtime_checkable
class PipelinedBroker(Broker, Protocol):
    """A broker that sends without a task per message (`WebSocketBroker` is one).

    `start_send` queues the frame and returns at once; `on_result` is called
    later, on the Trio thread, with the broker's answer: exactly once unless
    the handle is cancelled first. The same rules as `send` apply: it raises
    `BrokerUnavailable` if nothing could be queued, and answers
    `broker_disconnected` if the connection is lost with the send
    outstanding. The worker enforces its own ack deadline on top.
    """

    def start_send(self, message: OutgoingMessage, on_result: Callable[[SendResult], None]) -> SendHandle: ...


# -- routes --------------------------------------------------------------------


@attrs.frozen
class Ready:
    """Send through `broker`; `name` names the route in logs and statistics,
    `kind` and `key` identify it as in `Unavailable`."""

    name: str
    broker: Broker
    kind: str
    key: str | None


@attrs.frozen
class Unavailable:
    """The route exists (or may come) but its socket is not open now.

    `kind` and `key` identify the route to `BrokerRegistry.route_unavailable`:
    ("session", pubkey), ("mesh", slug) or ("default", None), the latter for
    rows with neither a session nor a mesh.
    """

    name: str
    kind: str
    key: str | None


@attrs.frozen
class NoBroker:
    """No broker will ever take this row: it goes dead."""

    mesh: str | None


Route = Ready | Unavailable | NoBroker


class BrokerRegistry:
    """Broker connections keyed by mesh slug and by session public key.

    Changing the registry, or a registered broker's connection opening,
    calls the registry's listeners (the drain worker's `wake`).
    """

    def __init__(self) -> None:
        self._meshes: dict[str, Broker] = {}
        self._sessions: dict[str, Broker] = {}
        self._listeners: list[Callable[[], None]] = []
        # Brokers whose openings we listen to; by identity, since ids are
        # reused after garbage collection and brokers need not be hashable.
        self._subscribed: list[Broker] = []

    # -- registration

    def set_mesh(self, slug: str, broker: Broker) -> None:
        """Route rows of mesh `slug` (and rows with no mesh, if it is the only
        one) through `broker`."""
        if not isinstance(slug, str) or not slug:
            raise ValueError("mesh slug must be a non-empty string")
        replaced = self._meshes.get(slug)
        self._meshes[slug] = broker
        if replaced is not None and replaced is not broker:
            self._unsubscribe(replaced)
        self._subscribe(broker)
        self._changed()

    def remove_mesh(self, slug: str) -> None:
        broker = self._meshes.pop(slug, None)
        if broker is not None:
            self._unsubscribe(broker)
        self._changed()

    def set_session(self, session_pubkey: str, broker: Broker) -> None:
        """Route rows whose `sender_session_pubkey` is `session_pubkey` (64
        hex) through `broker`, and only through it."""
        if not isinstance(session_pubkey, str) or not _HEX64.fullmatch(session_pubkey.lower()):
            raise ValueError("session public key must be 64 hex characters")
        replaced = self._sessions.get(session_pubkey.lower())
        self._sessions[session_pubkey.lower()] = broker
        if replaced is not None and replaced is not broker:
            self._unsubscribe(replaced)
        self._subscribe(broker)
        self._changed()

    def remove_session(self, session_pubkey: str) -> None:
        broker = self._sessions.pop(session_pubkey.lower(), None)
        if broker is not None:
            self._unsubscribe(broker)
        self._changed()

    @property
    def meshes(self) -> dict[str, Broker]:
        return dict(self._meshes)

    @property
    def sessions(self) -> dict[str, Broker]:
        return dict(self._sessions)

    # -- change notification

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def _subscribe(self, broker: Broker) -> None:
        add = getattr(broker, "add_open_listener", None)
        if add is not None and not any(b is broker for b in self._subscribed):
            self._subscribed.append(broker)
            add(self._changed)

    def _unsubscribe(self, broker: Broker) -> None:
        """Stop listening to a broker no longer registered anywhere: sessions
        come and go, and a removed broker must neither wake the worker nor
        be kept alive by the registry."""
        if any(b is broker for b in (*self._meshes.values(), *self._sessions.values())):
            return
        for i, known in enumerate(self._subscribed):
            if known is broker:
                del self._subscribed[i]
                remove = getattr(broker, "remove_open_listener", None)
                if remove is not None:
                    remove(self._changed)
                return

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()

    # -- routing

    def resolve(self, row: OutboxRow) -> Route:
        """Which connection `row` goes out through, per the rules above."""
        session = row.sender_session_pubkey
        if session is not None:
            name = f"session:{session[:12]}"
            broker = self._sessions.get(session.lower())
            if broker is not None and broker.is_open():
                return Ready(name, broker, "session", session.lower())
            return Unavailable(name, "session", session.lower())
        if row.mesh is not None:
            kind, key, name = "mesh", row.mesh, f"mesh:{row.mesh}"
            broker = self._meshes.get(row.mesh)
            if broker is None:
                return NoBroker(row.mesh)
        elif len(self._meshes) == 1:
            ((slug, broker),) = self._meshes.items()
            kind, key, name = "default", None, f"mesh:{slug}"
        else:
            return NoBroker(None)
        return Ready(name, broker, kind, key) if broker.is_open() else Unavailable(name, kind, key)

    def unavailable_route(self, row: OutboxRow) -> Unavailable:
        """The route of `row`, as an unavailable one (its socket just closed)."""
        if row.sender_session_pubkey is not None:
            pubkey = row.sender_session_pubkey.lower()
            return Unavailable(f"session:{pubkey[:12]}", "session", pubkey)
        if row.mesh is not None:
            return Unavailable(f"mesh:{row.mesh}", "mesh", row.mesh)
        only = next(iter(self._meshes), "?")
        return Unavailable(f"mesh:{only}", "default", None)

    def route_unavailable(self, kind: str, key: str | None) -> bool:
        """Whether rows of the route (kind, key) would resolve as Unavailable now."""
        if kind == "session":
            broker = self._sessions.get(key or "")
            return broker is None or not broker.is_open()
        if kind == "mesh":
            broker = self._meshes.get(key or "")
        else:
            broker = next(iter(self._meshes.values())) if len(self._meshes) == 1 else None
        return broker is not None and not broker.is_open()
