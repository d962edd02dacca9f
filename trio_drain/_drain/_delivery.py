"""A delivery: one claimed row on its way out, and the ways that way can end.

A delivery is a small record, not a task: per row there is no task, no
cancel scope and no event (a broker with only `send` gets a task, that is
all). The worker keeps every delivery in one table from the claim until
its outcome is handed to the batch completer, so a stopping worker can
hand back every row still out, sent or not.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING

from .._brokers._registry import Ready, SendHandle
from .._brokers._wire import SendResult
from .._model import OutboxRow

if TYPE_CHECKING:
    from ._gates import Gate

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
