"""A WebSocket broker's counters: a mutable tally it keeps, a frozen snapshot it hands out."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class WebSocketBrokerStatistics:
    """A snapshot of a `WebSocketBroker`'s counters (since it was created).

    Attributes:
        is_open: the hello was acknowledged and the connection is up.
        connects: connections whose hello was acknowledged.
        disconnects: those connections that have since closed.
        in_flight: sends awaiting their ack right now.
        frames_sent: send frames written (or queued) to a connection.
        acks_received: acks that answered a send, positive or not.
        unknown_acks: acks for an id no send was awaiting (ignored).
        errors_received: error frames (not about a send: logged only).
        pushes_received: other frames (each handed to `on_push`, if set).
        ack_timeouts: sends whose ack did not come within `ack_timeout`.
        pongs_missed: pings unanswered within `pong_timeout` (each dropped
            its connection).
    """

    is_open: bool
    connects: int
    disconnects: int
    in_flight: int
    frames_sent: int
    acks_received: int
    unknown_acks: int
    errors_received: int
    pushes_received: int
    ack_timeouts: int
    pongs_missed: int


@attrs.define
class Counters:
    """The live tally behind `WebSocketBrokerStatistics`, bumped on the hot path.

    Plain slotted attributes, so a bump costs one attribute store; the
    live values (`is_open`, `connects`, `in_flight`) are read when the
    snapshot is taken.
    """

    disconnects: int = 0
    frames_sent: int = 0
    acks_received: int = 0
    unknown_acks: int = 0
    errors_received: int = 0
    pushes_received: int = 0
    ack_timeouts: int = 0
    pongs_missed: int = 0
