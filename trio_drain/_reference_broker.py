"""The reference broker: a small, strict broker for tests, demos and CI.

It verifies both hello kinds (signature, clock skew, attestation expiry,
membership), enforces a payload limit, dedupes on (meshId,
client_message_id) with fingerprint comparison, keeps what it accepted in
SQLite when given a file (so dedupe survives a restart), and can inject
faults: ack delay, dropped acks, a transient error rate, and a disconnect
every N sends.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import json
import logging
import os
import random
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from . import _identity
from ._clock import wall_clock_ms
from ._errors import ConfigError
from ._ids import random_uuid
from ._routing import encode_json, json_string
from ._store._sqlite import _GroupCommitter
from ._transport import ServerConnection, TransportClosed, serve_websocket
from ._ws_broker import MAX_FRAME, parse_frame

log = logging.getLogger("trio_drain.reference_broker")

MAX_SKEW_MS = 60_000
DEFAULT_MAX_PAYLOAD = 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


@attrs.frozen(kw_only=True)
class Faults:
    """Faults the broker injects, for tests and demos. All off by default.

    Attributes:
        ack_delay: seconds before each ack is sent (sends are handled
            concurrently, so this adds latency, not a throughput cap).
        drop_ack_rate: probability that a send is accepted but never acked.
        transient_error_rate: probability of a transient error ack.
        disconnect_every: close a connection abruptly after this many sends.
    """

    ack_delay: float = 0.0
    drop_ack_rate: float = 0.0
    transient_error_rate: float = 0.0
    disconnect_every: int = 0


@attrs.frozen
class _Acceptance:
    """One send the broker took, to persist before it is acked."""

    mesh: str
    client_message_id: str
    fingerprint: str
    message_id: str
    target: str
    ack_id: Any  # the send frame's id, echoed in the ack

    @property
    def key(self) -> tuple[str, str]:
        return (self.mesh, self.client_message_id)


@attrs.define
class BrokerStatistics:
    """Live counters of a running reference broker."""

    connections: int = 0
    hellos_rejected: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    transient_errors: int = 0
    dropped_acks: int = 0
    disconnects: int = 0


def load_members(path: str | Path) -> dict[str, dict[str, str]]:
    """Read a members file: ``{"<meshId>": {"<memberId>": "<pubkey hex>"}}``.

    Raises:
        ConfigError: unreadable or malformed.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read members file {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"members file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)
                                    for k, v in m.items())
        for m in data.values()
    ):
        raise ConfigError(f"members file {path} must map mesh ids to {{member id: 64-hex pubkey}}")
    return data


class _Ledger:
    """What the broker accepted: (mesh, client id) -> (fingerprint, message id)."""

    def __init__(self, path: Path | None) -> None:
        self.entries: dict[tuple[str, str], tuple[str, str]] = {}
        # Acceptances still being written: a resend of one must wait for it,
        # or we would ack a duplicate of something a crash could forget.
        self.unwritten: dict[tuple[str, str], trio.Event] = {}
        self._committer: _GroupCommitter | None = None
        if path is not None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS accepted (mesh TEXT NOT NULL, client_message_id TEXT NOT NULL,"
                " fingerprint TEXT NOT NULL, message_id TEXT NOT NULL, target TEXT, received_at INTEGER,"
                " PRIMARY KEY (mesh, client_message_id))"
            )
            for mesh, cid, fp, mid in conn.execute(
                "SELECT mesh, client_message_id, fingerprint, message_id FROM accepted"
            ):
                self.entries[(mesh, cid)] = (fp, mid)
            self._committer = _GroupCommitter(conn, durable=False)

    @property
    def persistent(self) -> bool:
        return self._committer is not None

    async def record(self, a: _Acceptance) -> None:
        """Persist one acceptance before it is acked (concurrent calls share a commit)."""
        if self._committer is None:
            return
        row = (a.mesh, a.client_message_id, a.fingerprint, a.message_id, a.target, wall_clock_ms())

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO accepted VALUES (?, ?, ?, ?, ?, ?)", row)

        await self._committer.submit(insert, durable=False)

    async def aclose(self) -> None:
        """Wait out writes in progress, then close the database."""
        if self._committer is not None:
            with trio.CancelScope(shield=True):
                await self._committer.aclose()


@attrs.define
class BrokerServer:
    """A running reference broker (what `nursery.start(serve_broker)` returns)."""

    host: str
    port: int
    statistics: BrokerStatistics
    ledger: _Ledger = attrs.field(repr=False)
    faults: Faults

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def accepted(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(meshId, client_message_id) -> (fingerprint hex, message id)."""
        return dict(self.ledger.entries)


async def serve_broker(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    db: str | Path | None = None,
    members: Mapping[str, Mapping[str, str]] | None = None,
    open_mode: bool = False,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    faults: Faults = Faults(),
    receipts: str | Path | None = None,
    task_status: trio.TaskStatus[BrokerServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference broker until cancelled.

    With ``await nursery.start(serve_broker, ...)`` it returns the
    `BrokerServer` (with the bound port) once it accepts connections.

    Args:
        members: mesh id -> {member id -> pubkey hex}; required unless `open_mode`.
        open_mode: accept any correctly signed hello.
        db: SQLite file keeping what was accepted, so dedupe survives restarts.
        receipts: a file to which every send frame received is appended, as
            one ``meshId<TAB>client_message_id`` line, written at once (it
            survives the broker being killed). For counting transmissions
            in tests; it costs a write per frame.
    """
    if members is None and not open_mode:
        raise ConfigError("the broker needs a members file, or open mode")
    ledger = await trio.to_thread.run_sync(_Ledger, None if db is None else Path(db))
    server_state = BrokerServer(host, port, BrokerStatistics(), ledger, faults)
    handler = _Handler(server_state, dict(members or {}), open_mode, max_payload)
    if receipts is not None:
        handler.receipts_fd = os.open(receipts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            server_state.port = await nursery.start(functools.partial(
                serve_websocket, handler.handle, host, port, max_message_size=max(MAX_FRAME, 2 * max_payload),
            ))
            log.info("reference broker listening on %s", server_state.url)
            task_status.started(server_state)
    finally:
        await ledger.aclose()
        if handler.receipts_fd is not None:
            os.close(handler.receipts_fd)


class _Handler:
    def __init__(self, state: BrokerServer, members: dict[str, Mapping[str, str]], open_mode: bool,
                 max_payload: int) -> None:
        self.state = state
        self.stats = state.statistics
        self.members = members
        self.open_mode = open_mode
        self.max_payload = max_payload
        self.rng = random.Random()
        self.receipts_fd: int | None = None

    async def handle(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        try:
            mesh = await self._hello(ws)
            if mesh is None:
                return
            await self._serve(ws, mesh)
        except TransportClosed:
            pass

    async def _hello(self, ws: ServerConnection) -> str | None:
        with trio.move_on_after(5.0):
            verdict = self._judge_hello(parse_frame(await ws.get_message()))
            if isinstance(verdict, str):
                ws.send_message_nowait(json.dumps({"type": "hello_ack", "presenceId": random_uuid()}))
                return verdict
            code, message = verdict
            self.stats.hellos_rejected += 1
            ws.send_message_nowait(json.dumps({"type": "error", "code": code, "message": message}))
            await ws.aclose(4001, code)
            return None
        await ws.aclose(4008, "hello_timeout")
        return None

    def _judge_hello(self, frame: dict[str, Any] | None) -> str | tuple[str, str]:
        """The mesh id a hello admits to, or the (code, message) refusing it."""
        if frame is None:
            return ("bad_hello", "malformed hello: not a JSON object")
        try:
            problem = self._check_hello(frame)
        except (ValueError, TypeError, KeyError) as exc:
            return ("bad_hello", f"malformed hello: {exc}")
        return str(frame["meshId"]) if problem is None else problem

    def _check_hello(self, f: dict[str, Any]) -> tuple[str, str] | None:
        now = wall_clock_ms()
        kind = f.get("type")
        if kind not in ("hello", "session_hello"):
            return ("bad_hello", "first frame must be hello or session_hello")
        mesh, ts, sig = f["meshId"], f["timestamp"], f["signature"]
        if not isinstance(mesh, str) or not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(sig, str):
            return ("bad_hello", "meshId, timestamp and signature have the wrong types")
        if abs(now - ts) > MAX_SKEW_MS:
            return ("timestamp_skew", f"timestamp is {abs(now - ts) // 1000}s off")
        if kind == "hello":
            member, pubkey = f["memberId"], f["pubkey"]
            if not _identity.verify(pubkey, f"{mesh}|{member}|{pubkey}|{ts}", sig):
                return ("bad_signature", "hello signature does not verify")
            return self._check_member(mesh, member, pubkey)
        parent, parent_key, session_key = f["parentMemberId"], f["parentMemberPubkey"], f["sessionPubkey"]
        att = f["parentAttestation"]
        if not isinstance(att, dict):
            return ("bad_hello", "parentAttestation must be an object")
        if att["sessionPubkey"] != session_key or att["parentMemberPubkey"] != parent_key:
            return ("bad_attestation", "attestation is for other keys")
        expires = att["expiresAt"]
        if not isinstance(expires, int) or expires <= now:
            return ("attestation_expired", "parent attestation has expired")
        attest_text = f"{_identity.ATTEST_PREFIX}|{parent_key}|{session_key}|{expires}"
        if not _identity.verify(parent_key, attest_text, att["signature"]):
            return ("bad_attestation", "attestation signature does not verify")
        hello_text = f"{_identity.SESSION_HELLO_PREFIX}|{mesh}|{parent_key}|{session_key}|{ts}"
        if not _identity.verify(session_key, hello_text, sig):
            return ("bad_signature", "session hello signature does not verify")
        return self._check_member(mesh, parent, parent_key)

    def _check_member(self, mesh: str, member: Any, pubkey: Any) -> tuple[str, str] | None:
        if self.open_mode:
            return None
        known = self.members.get(mesh, {}).get(member)
        if known is None or known != pubkey:
            return ("not_a_member", f"{member} is not a member of {mesh} with that key")
        return None

    async def _serve(self, ws: ServerConnection, mesh: str) -> None:
        sends = 0
        acks = _AckQueue(ws, self.state.faults)
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
                    ack, record = self._decide(mesh, frame)
                    key = (mesh, str(frame.get("client_message_id")))
                    wait_for = key if record is None and key in self.state.ledger.unwritten else None
                    if record is not None or wait_for is not None:
                        nursery.start_soon(self._finish, acks, ack, record, wait_for)
                    elif ack is not None:
                        acks.send(ack)
                    every = self.state.faults.disconnect_every
                    if every and sends % every == 0:
                        self.stats.disconnects += 1
                        await ws.aclose(1011, "fault_injection")
                        nursery.cancel_scope.cancel()
                        return
            nursery.cancel_scope.cancel()

    async def _finish(
        self, acks: _AckQueue, ack: dict[str, Any] | None, record: _Acceptance | None,
        wait_for: tuple[str, str] | None,
    ) -> None:
        """Persist an acceptance (sharing commits with concurrent ones), then ack.

        The write is shielded: a connection closing must not cancel the
        persistence of something already entered in the dedupe table.
        """
        ledger = self.state.ledger
        if record is not None:
            key = record.key
            written = ledger.unwritten[key] = trio.Event()
            try:
                with trio.CancelScope(shield=True):
                    await ledger.record(record)
            except Exception as exc:
                ledger.entries.pop(key, None)
                self.stats.accepted -= 1
                log.error("cannot persist %s: %s", record.client_message_id, exc)
                ack = _error(record.ack_id, "storage_unavailable", "unavailable", False)
            finally:
                del ledger.unwritten[key]
                written.set()
        elif wait_for is not None and wait_for in ledger.unwritten:
            await ledger.unwritten[wait_for].wait()
            if wait_for not in ledger.entries:  # the original failed to persist
                ack = None if ack is None else _error(ack["id"], "storage_unavailable", "unavailable", False)
        if ack is not None:
            acks.send(ack)

    def _decide(self, mesh: str, f: dict[str, Any]) -> tuple[dict[str, Any] | None, _Acceptance | None]:
        """The answer to one send, decided at once so racing resends dedupe.

        Returns the ack (None for a dropped one) and, for a new acceptance on
        a persistent broker, the record to write before acking.
        """
        answer, record = self._answer(mesh, f)
        ack: dict[str, Any] | None = answer
        drop = self.state.faults.drop_ack_rate
        if ack is not None and ack.get("queued") and drop and self.rng.random() < drop:
            self.stats.dropped_acks += 1
            ack = None
        return ack, record

    def _answer(self, mesh: str, f: dict[str, Any]) -> tuple[dict[str, Any], _Acceptance | None]:
        cid, fp = f.get("client_message_id"), f.get("request_fingerprint")
        ack_id = f.get("id", cid)
        if not isinstance(cid, str) or not cid or not isinstance(fp, str):
            self.stats.rejected += 1
            return _error(ack_id, "invalid_send: client_message_id and request_fingerprint required", "invalid", True), None
        ciphertext = f.get("ciphertext")
        try:
            size = len(base64.b64decode(ciphertext, validate=True)) if isinstance(ciphertext, str) else -1
        except (binascii.Error, ValueError):
            size = -1
        if size < 0:
            self.stats.rejected += 1
            return _error(ack_id, "invalid_send: ciphertext must be base64", "invalid", True), None
        if size > self.max_payload:
            self.stats.rejected += 1
            return _error(ack_id, "payload_too_large", "payload_too_large", True), None
        faults, entries = self.state.faults, self.state.ledger.entries
        if faults.transient_error_rate and self.rng.random() < faults.transient_error_rate:
            self.stats.transient_errors += 1
            return _error(ack_id, "transient_fault", "unavailable", False), None
        known = entries.get((mesh, cid))
        if known is not None:
            if known[0] != fp:
                self.stats.rejected += 1
                return _error(ack_id, "idempotency_key_reused", "idempotency_key_reused", True), None
            self.stats.duplicates += 1
            return {"type": "ack", "id": ack_id, "messageId": known[1], "queued": True, "duplicate": True}, None
        message_id = random_uuid()
        entries[(mesh, cid)] = (fp, message_id)  # at once, so a racing resend is a duplicate
        self.stats.accepted += 1
        ack = {"type": "ack", "id": ack_id, "messageId": message_id, "queued": True}
        if not self.state.ledger.persistent:
            return ack, None
        return ack, _Acceptance(mesh, cid, fp, message_id, str(f.get("targetSpec")), ack_id)


_ACK_TEMPLATE = '{"type":"ack","id":%s,"messageId":%s,"queued":true}'


def _encode_ack(frame: dict[str, Any]) -> str:
    """An ack frame as JSON text: the plain "queued" ack (nearly all of them)
    from a template, the rest by the encoder (which costs three times as much)."""
    if (len(frame) == 4 and frame.get("queued") is True and type(frame["id"]) is str
            and type(frame.get("messageId")) is str):
        return _ACK_TEMPLATE % (json_string(frame["id"]), json_string(frame["messageId"]))
    return encode_json(frame)


def _error(ack_id: Any, error: str, code: str, permanent: bool) -> dict[str, Any]:
    return {"type": "ack", "id": ack_id, "messageId": "", "queued": False, "error": error, "code": code,
            "permanent": permanent}


class _AckQueue:
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
        text = _encode_ack(frame)
        delay = self.faults.ack_delay
        if delay > 0:
            self._due.append((trio.current_time() + delay, text))
            self._queued.set()
        else:
            self._write(text)

    async def run(self) -> None:
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
