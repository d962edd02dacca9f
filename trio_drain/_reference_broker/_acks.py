"""The acks the reference broker writes: their frames, their encoding, and one connection's queue of them.

This is the broker's hot path in benchmarks: the plain "queued" ack is
written from a template, and delayed acks share one task per connection.
"""

from __future__ import annotations

import collections
from typing import Any

import trio

from .._brokers._wire import encode_json, json_string
from .._ws import ServerConnection, TransportClosed
from ._limits import Faults

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


class AckQueue:
    """Acks of one connection, sent at once or after the fault's ack delay.

    Delayed acks wait in a queue served by one task (the delay is the same
    for every ack, so the queue is in due order), not one task each. Sends
    are queued on the connection and go out coalesced.
    """

    def __init__(self, ws: ServerConnection, faults: Faults) -> None:
        self.ws = ws
        self.faults = faults
        self._due: collections.deque[tuple[float, str]] = collections.deque()
        self._queued = trio.Event()

    def send(self, frame: dict[str, Any]) -> None:
        """Send an ack now, or queue it for the fault's ack delay."""
        text = encode_ack(frame)
        delay = self.faults.ack_delay
        if delay > 0:
            self._due.append((trio.current_time() + delay, text))
            self._queued.set()
        else:
            self._write(text)

    async def run(self) -> None:
        """Send delayed acks as they fall due, until cancelled."""
        while True:
            await self._queued.wait()
            now = trio.current_time()
            while self._due:
                due, text = self._due[0]
                if due > now:
                    await trio.sleep_until(due)
                    now = trio.current_time()
                self._due.popleft()
                self._write(text)
            self._queued = trio.Event()

    def _write(self, text: str) -> None:
        try:
            self.ws.send_message_nowait(text)
        except TransportClosed:
            pass
