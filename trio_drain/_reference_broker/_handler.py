"""One connection to the reference broker: the hello exchange, then each send decided, persisted and acked.

A send's answer is decided the moment it arrives, so racing resends
dedupe; a new acceptance on a persistent broker is written (sharing a
commit with its neighbours) before its ack goes out. With a capacity
(`Faults.capacity`), a send that arrives while that many sends of its
connection wait for their ack is answered at once: ``overloaded``. In compat mode the
answers are the seed's real broker's (see the package docstring).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, Literal

import trio

from .._brokers._wire import js_length, parse_frame
from .._ids import random_uuid
from .._model import PRIORITIES
from .._ws import ServerConnection, TransportClosed
from ._acks import AckQueue, claudemesh_error_ack, error_ack
from ._hello import judge_hello
from ._ledger import Acceptance, Ledger
from ._limits import CLAUDEMESH_MAX_MESSAGE_BYTES, AckDelaySchedule, Buckets, Faults
from ._statistics import Counters

log = logging.getLogger("trio_drain.reference_broker")

#: A real broker to answer like instead of strictly: the seed's (claudemesh).
Compat = Literal["claudemesh"]


class Handler:
    """Serves every connection of one broker; the state they share lives here."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        faults: Faults,
        counters: Counters,
        members: Mapping[str, Mapping[str, str]],
        open_mode: bool,
        max_payload: int,
        compat: Compat | None = None,
        max_message_bytes: int = CLAUDEMESH_MAX_MESSAGE_BYTES,
    ) -> None:
        self.ledger = ledger
        self.faults = faults
        self.stats = counters
        self.members = members
        self.open_mode = open_mode
        self.max_payload = max_payload
        self.compat = compat
        self.max_message_bytes = max_message_bytes
        limit = faults.rate_limit
        self.buckets = None if limit is None else Buckets(limit)
        self.rng = random.Random()
        self.receipts_fd: int | None = None
        # An ack delay schedule counts from here (serve_broker makes the handler as it starts).
        self.started = trio.current_time()
        steps = faults.ack_delay_schedule
        schedule = None if steps is None else AckDelaySchedule(steps)
        self.ack_delay: float | Callable[[], float] = (
            faults.ack_delay
            if schedule is None
            else (lambda: schedule.delay_at(trio.current_time() - self.started))
        )

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one connection until it closes."""
        self.stats.connections += 1
        try:
            member = await self._hello(ws)
            if member is None:
                return
            await self._serve(ws, *member)
        except TransportClosed:
            pass

    async def _hello(self, ws: ServerConnection) -> tuple[str, str] | None:
        """The (mesh id, member id) a hello admits, or None (refused, or unanswered)."""
        frame: dict[str, Any] | None = None
        with trio.move_on_after(5.0) as waiting:
            frame = parse_frame(await ws.get_message())
        if waiting.cancelled_caught:
            await ws.aclose(4008, "hello_timeout")
            return None
        if self.compat and frame is not None and not isinstance(frame.get("cwd"), str):
            # The real broker's presence insert fails on a null cwd; it logs
            # that and never answers, leaving the socket open.
            self.stats.hellos_rejected += 1
            log.warning("hello without cwd: not answered (as the real broker)")
            await trio.sleep_forever()
        verdict = judge_hello(frame, self.members, self.open_mode)
        if len(verdict) == 3:
            ws.send_message_nowait(json.dumps({"type": "hello_ack", "presenceId": random_uuid()}))
            return verdict[1], verdict[2]
        code, message = verdict[0], verdict[1]
        self.stats.hellos_rejected += 1
        ws.send_message_nowait(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.aclose(4001, code)
        return None

    async def _serve(self, ws: ServerConnection, mesh: str, member: str) -> None:
        sends = 0
        acks = AckQueue(ws, self.ack_delay)
        capacity = self.faults.capacity
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acks.run)
            while True:
                try:
                    batch = await ws.get_messages()
                except TransportClosed:
                    break
                for raw in batch:
                    frame = parse_frame(raw)
                    if frame is None or frame.get("type") != "send":
                        continue
                    sends += 1
                    if self.receipts_fd is not None:
                        os.write(self.receipts_fd, f"{mesh}\t{frame.get('client_message_id')}\n".encode())
                    if capacity and acks.waiting >= capacity:
                        self.stats.overloaded += 1
                        acks.send_now(self._overloaded(frame, capacity))
                        continue
                    ack, record = self._decide(mesh, member, frame)
                    key = (mesh, str(frame.get("client_message_id")))
                    wait_for = key if record is None and key in self.ledger.unwritten else None
                    if record is not None or wait_for is not None:
                        acks.pending += 1
                        nursery.start_soon(self._finish, acks, ack, record, wait_for)
                    elif ack is not None:
                        acks.send(ack)
                    every = self.faults.disconnect_every
                    if every and sends % every == 0:
                        self.stats.disconnects += 1
                        await ws.aclose(1011, "fault_injection")
                        nursery.cancel_scope.cancel()
                        return
            nursery.cancel_scope.cancel()

    async def _finish(
        self,
        acks: AckQueue,
        ack: dict[str, Any] | None,
        record: Acceptance | None,
        wait_for: tuple[str, str] | None,
    ) -> None:
        """Persist an acceptance (or wait for the one it repeats), then ack."""
        try:
            ack = await self._persist(ack, record, wait_for)
        finally:
            acks.pending -= 1
        if ack is not None:
            acks.send(ack)

    async def _persist(
        self,
        ack: dict[str, Any] | None,
        record: Acceptance | None,
        wait_for: tuple[str, str] | None,
    ) -> dict[str, Any] | None:
        """Persist an acceptance (sharing commits with concurrent ones), or
        wait for the one a resend repeats; return the ack it earns.

        The write is shielded: a connection closing must not cancel the
        persistence of something already entered in the dedupe table.
        """
        ledger = self.ledger
        if record is not None:
            key = record.key
            with trio.CancelScope(shield=True):  # it was entered: it is written, or undone
                while key in ledger.unwritten:  # a copy accepted again while the first is written
                    await ledger.unwritten[key].wait()
            written = ledger.unwritten[key] = trio.Event()
            try:
                with trio.CancelScope(shield=True):
                    await ledger.record(record)
            except Exception as exc:
                ledger.copies[key] -= 1
                if record.previous is None:
                    ledger.entries.pop(key, None)
                else:  # a copy (no dedupe): the earlier acceptance stands
                    ledger.entries[key] = record.previous
                self.stats.accepted -= 1
                log.error("cannot persist %s: %s", record.client_message_id, exc)
                ack = self._error(record.ack_id, "storage_unavailable", "unavailable", False)
            finally:
                del ledger.unwritten[key]
                written.set()
        elif wait_for is not None and wait_for in ledger.unwritten:
            await ledger.unwritten[wait_for].wait()
            if wait_for not in ledger.entries:  # the original failed to persist
                ack = (
                    None
                    if ack is None
                    else self._error(ack["id"], "storage_unavailable", "unavailable", False)
                )
        return ack

    def _overloaded(self, f: dict[str, Any], capacity: int) -> dict[str, Any]:
        """The answer to a send that finds the connection at its capacity."""
        ack_id = f.get("id", f.get("client_message_id"))
        if self.compat and ack_id is None:
            ack_id = ""
        return self._error(ack_id, f"overloaded: {capacity} sends waiting for their ack", "overloaded", False)

    def _decide(
        self, mesh: str, member: str, f: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Acceptance | None]:
        """The answer to one send, decided at once so racing resends dedupe.

        Returns the ack (None for none: a dropped one, or a frame the
        claudemesh broker could not handle) and, for a new acceptance on a
        persistent broker, the record to write before acking.
        """
        answer, record = self._answer(mesh, member, f)
        ack: dict[str, Any] | None = answer
        drop = self.faults.drop_ack_rate
        if ack is not None and ack.get("queued") and drop and self.rng.random() < drop:
            self.stats.dropped_acks += 1
            ack = None
        return ack, record

    def _answer(
        self, mesh: str, member: str, f: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Acceptance | None]:
        cid, fp = f.get("client_message_id"), f.get("request_fingerprint")
        ack_id = f.get("id", cid)
        faults = self.faults
        if self.compat:
            if not isinstance(f.get("targetSpec"), str) or f.get("priority") not in PRIORITIES:
                self.stats.unanswered += 1  # its handler throws: nothing is sent back
                return None, None
            ack_id = "" if ack_id is None else ack_id
        if self.buckets is not None and not self.buckets.take((mesh, member), trio.current_time()):
            self.stats.rate_limited += 1
            limit = self.buckets.limit
            text = f"rate_limit: max {limit.per_minute:g} msg/min (burst {limit.burst})"
            return self._error(
                ack_id, text + (" — slow down" if self.compat else ""), "rate_limit", False
            ), None
        problem = self._compat_problem(f) if self.compat else self._problem(f)
        if problem is not None:
            self.stats.rejected += 1
            return self._error(ack_id, *problem, True), None
        if faults.transient_error_rate and self.rng.random() < faults.transient_error_rate:
            self.stats.transient_errors += 1
            return self._error(ack_id, "transient_fault", "unavailable", False), None
        if not isinstance(cid, str) or not cid:  # compat: the real broker queues it with no id
            cid = random_uuid()
        entries, key = self.ledger.entries, (mesh, cid)
        known = entries.get(key)
        if known is not None and not self.compat:
            if known[0] != fp:
                self.stats.rejected += 1
                return self._error(ack_id, "idempotency_key_reused", "idempotency_key_reused", True), None
            self.stats.duplicates += 1
            return {
                "type": "ack",
                "id": ack_id,
                "messageId": known[1],
                "queued": True,
                "duplicate": True,
            }, None
        if known is not None:
            self.stats.redelivered += 1  # no dedupe: a copy delivered again
        message_id = random_uuid()
        entries[key] = (str(fp), message_id)  # at once, so a racing resend is a duplicate
        self.ledger.copies[key] += 1
        self.stats.accepted += 1
        ack = {"type": "ack", "id": ack_id, "messageId": message_id, "queued": True}
        if not self.ledger.persistent:
            return ack, None
        return ack, Acceptance(mesh, cid, str(fp), message_id, str(f.get("targetSpec")), ack_id, known)

    def _problem(self, f: dict[str, Any]) -> tuple[str, str] | None:
        """Why this broker refuses a send for good: (error, code), or None."""
        cid, fp = f.get("client_message_id"), f.get("request_fingerprint")
        if not isinstance(cid, str) or not cid or not isinstance(fp, str):
            return "invalid_send: client_message_id and request_fingerprint required", "invalid"
        if not isinstance(f.get("targetSpec"), str) or f.get("priority") not in PRIORITIES:
            return "invalid_send: targetSpec and a priority of now, next or low required", "invalid"
        ciphertext = f.get("ciphertext")
        try:
            size = len(base64.b64decode(ciphertext, validate=True)) if isinstance(ciphertext, str) else -1
        except (binascii.Error, ValueError):
            size = -1
        if size < 0:
            return "invalid_send: ciphertext must be base64", "invalid"
        if size > self.max_payload:
            return "payload_too_large", "payload_too_large"
        return None

    def _compat_problem(self, f: dict[str, Any]) -> tuple[str, str] | None:
        """The real broker checks only the size of what it would store."""
        size = sum(
            js_length(v)
            for v in (f.get("ciphertext"), f.get("nonce"), f.get("targetSpec"))
            if isinstance(v, str)
        )
        if size > self.max_message_bytes:
            return (
                f"payload too large: {size} bytes > MAX_MESSAGE_BYTES={self.max_message_bytes}",
                "too_large",
            )
        return None

    def _error(self, ack_id: Any, error: str, code: str, permanent: bool) -> dict[str, Any]:
        if self.compat:  # the real broker's acks carry no code, permanent or duplicate
            return claudemesh_error_ack(ack_id, error)
        return error_ack(ack_id, error, code, permanent)
