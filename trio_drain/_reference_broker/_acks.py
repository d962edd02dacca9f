"""The acks the reference broker writes: their frames, their encoding, and one connection's queue of them.

This is the broker's hot path in benchmarks: the plain "queued" ack is
written from a template, and delayed acks share one task per connection.
"""

from __future__ import annotations

import bisect
import collections
import operator
from collections.abc import Callable
from typing import Any

import trio

from .._brokers._wire import encode_json, json_string
from .._ws import ServerConnection, TransportClosed

_ACK_TEMPLATE = '{"type":"ack","id":%s,"messageId":%s,"queued":true}'


def encode_ack(frame: dict[str, Any]) -> str:
    """An ack frame as JSON text: the plain "queued" ack (nearly all of them)
    from a template, the rest by the encoder (which costs three times as much)."""
    if (
        len(frame) == 4
        and frame.get("queued") is True
        and type(frame["id"]) is str
        and type(frame.get("messageId")) is str
    ):
        return _ACK_TEMPLATE % (json_string(frame["id"]), json_string(frame["messageId"]))
    return encode_json(frame)


def error_ack(ack_id: Any, error: str, code: str, permanent: bool) -> dict[str, Any]:
    """A refusal in this library's protocol: the error text, its code and whether it is for good."""
    return {
        "type": "ack",
        "id": ack_id,
        "messageId": "",
        "queued": False,
        "error": error,
        "code": code,
        "permanent": permanent,
    }


def claudemesh_error_ack(ack_id: Any, error: str) -> dict[str, Any]:
    """A refusal as the real broker writes it: no `code`, `permanent` or `duplicate`."""
    return {"type": "ack", "id": ack_id, "messageId": "", "queued": False, "error": error}


_DUE = operator.itemgetter(0)


class AckQueue:
    """Acks of one connection, sent at once or after the fault's ack delay.

    Delayed acks wait in a queue served by one task (while the delay holds
    still the queue is in due order; when a schedule shortens it, an ack is
    put in its place), not one task each. Sends are queued on the
    connection and go out coalesced.

    Args:
        ws: the connection.
        delay: the ack delay in seconds, or a function giving it now.
    """

    def __init__(self, ws: ServerConnection, delay: float | Callable[[], float]) -> None:
        self.ws = ws
        self._delay = delay
        self._due: collections.deque[tuple[float, str]] = collections.deque()
        self._queued = trio.Event()
        self._earlier = trio.Event()  # an ack went to the head of the queue
        #: Answers decided but waiting for something else than the delay
        #: (a write to the ledger); kept by the connection's handler.
        self.pending = 0

    @property
    def waiting(self) -> int:
        """Sends of this connection whose ack is not written yet."""
        return len(self._due) + self.pending

    def send(self, frame: dict[str, Any]) -> None:
        """Send an ack now, or queue it for the fault's ack delay."""
        text = encode_ack(frame)
        delay = self._delay if isinstance(self._delay, float | int) else self._delay()
        if delay > 0:
            due = (trio.current_time() + delay, text)
            if self._due and due[0] < self._due[-1][0]:
                bisect.insort(self._due, due, key=_DUE)  # the delay shortened: in due order
                if self._due[0] is due:
                    self._earlier.set()
            else:
                self._due.append(due)
            self._queued.set()
        else:
            self._write(text)

    def send_now(self, frame: dict[str, Any]) -> None:
        """Send an ack at once, whatever the delay."""
        self._write(encode_ack(frame))

    async def run(self) -> None:
        """Send delayed acks as they fall due, until cancelled."""
        while True:
            await self._queued.wait()
            now = trio.current_time()
            while self._due:
                due, text = self._due[0]
                if due > now:
                    with trio.move_on_at(due):
                        await self._earlier.wait()
                    self._earlier = trio.Event()
                    now = trio.current_time()
                    continue  # the head may have changed meanwhile
                self._due.popleft()
                self._write(text)
            self._queued = trio.Event()

    def _write(self, text: str) -> None:
        try:
            self.ws.send_message_nowait(text)
        except TransportClosed:
            pass
