"""A delivery: one claimed row on its way out, the gate of the route it goes
through, and the ways that way can end.

A delivery is a small record, not a task: per row there is no task, no
cancel scope and no event (a broker with only `send` gets a task, that is
all). The worker keeps every delivery in one table from the claim until
its outcome is handed to the batch completer, so a stopping worker can
hand back every row still out, sent or not.

A delivery names its route's gate and a gate holds the deliveries that
wait for it, so the two records live here together; what the gates of all
routes decide (which are down, paced, what a claim leaves out) is
`_gates`.
"""

from __future__ import annotations

import collections
import enum
import math

from .._brokers._pacing import RoutePacer
from .._brokers._registry import Ready, SendHandle
from .._brokers._wire import SendResult
from .._model import OutboxRow
from .._store._base import RouteKey

#: The answer a send gets when its ack deadline passes first.
ACK_TIMEOUT = SendResult.no_answer("ack_timeout")


class Settled(enum.Enum):
    """How a delivery ended, for the counters."""

    RESULT = "result"  # the broker answered (or the ack deadline passed), or no broker exists
    GIVEN_BACK = "given_back"  # never sent: back with its attempt returned
    RELEASED = "released"  # sent, then the worker stopped before the answer


class Delivery:
    """One claimed row on its way out, held until its outcome is handed on."""

    __slots__ = (
        "counted",
        "deadline",
        "gate",
        "handle",
        "held_since",
        "route",
        "route_name",
        "row",
        "sent",
        "sent_at",
        "slot",
    )

    def __init__(self, row: OutboxRow, slot: object) -> None:
        self.row = row
        self.slot = slot  # its CapacityLimiter token
        self.route_name = ""
        self.sent = False  # the frame may have left
        self.sent_at = math.inf  # trio time
        self.handle: SendHandle | None = None  # a pipelined send's, to cancel
        self.deadline = math.inf  # a pipelined send's ack deadline (trio time)
        self.gate: Gate | None = None  # its route's pacing, once routed
        self.route: Ready | None = None
        self.held_since = math.inf  # waiting for its route's slow start (trio time)
        self.counted = False  # in its pacer's unanswered count (from the send until settled)


class Gate:
    """One route's pacing: its pacer, its unanswered sends, and the rows
    claimed for it that wait for slow start to let them go."""

    __slots__ = ("held", "key", "last_claim", "maybe_more", "name", "pacer")

    def __init__(self, name: str, key: RouteKey, pacer: RoutePacer) -> None:
        self.name = name
        self.key = key
        self.pacer = pacer
        self.held: collections.deque[Delivery] = collections.deque()
        self.maybe_more = True  # rows of this route may be due (paced routes)
        self.last_claim = -math.inf  # trio time of its last claim of its own
