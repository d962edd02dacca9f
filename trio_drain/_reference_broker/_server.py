"""The reference broker: a small, strict broker for tests, demos and CI.

It verifies both hello kinds (signature, clock skew, attestation expiry,
membership, `cwd` present), enforces a payload limit, rate-limits each
member when asked (a token bucket: a burst, then so many a minute), dedupes
on (meshId, client_message_id) with fingerprint comparison, keeps what it
accepted in SQLite when given a file (so dedupe survives a restart), and can
inject faults: ack delay, dropped acks, a transient error rate, and a
disconnect every N sends.

With ``compat="claudemesh"`` it answers like the seed's real broker, as
observed by running it: acks without `code`, `permanent` or `duplicate`,
its error texts, no dedupe (a resend is accepted again under a new message
id), the size limit on ciphertext + nonce + target, silence on a hello
without `cwd` (its presence insert fails and it never answers) and on a
send frame it cannot handle (no `targetSpec`, a priority outside the
three: its handler throws and nothing is sent back).
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
from typing import Any, Literal

import attrs
import trio

from .._brokers import _identity
from .._brokers._wire import MAX_FRAME, encode_json, js_length, json_string, parse_frame
from .._clock import wall_clock_ms
from .._errors import ConfigError, StoreError
from .._ids import random_uuid
from .._model import PRIORITIES
from .._store._group_commit import GroupCommitter
from .._ws import ServerConnection, TransportClosed, serve_websocket

log = logging.getLogger("trio_drain.reference_broker")

MAX_SKEW_MS = 60_000
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: The real broker's limit on ciphertext + nonce + target, in characters.
CLAUDEMESH_MAX_MESSAGE_BYTES = 65_536
_HEX64 = re.compile(r"[0-9a-f]{64}")
Compat = Literal["claudemesh"]


@attrs.frozen
class RateLimit:
    """A member may send a burst of `burst`, then `per_minute` a minute."""

    burst: int
    per_minute: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``"BURST/PER_MIN"``, as ``10/60`` (the real broker's default).

        Raises:
            ConfigError: not of that form, or not positive.
        """
        burst, sep, per_minute = text.partition("/")
        try:
            limit = cls(int(burst), float(per_minute))
        except ValueError:
            raise ConfigError(f"rate limit must read BURST/PER_MIN, as 10/60; got {text!r}") from None
        if not sep or limit.burst < 1 or not 0 < limit.per_minute < float("inf"):
            raise ConfigError(f"rate limit must be a positive burst and rate, as 10/60; got {text!r}")
        return limit


class _Buckets:
    """Token buckets per key, as the real broker keeps them per member."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._per_second = limit.per_minute / 60
        self._buckets: dict[Any, list[float]] = {}  # key -> [tokens, stamp]

    def take(self, key: Any, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.limit.burst), now]
        tokens = min(float(self.limit.burst), bucket[0] + (now - bucket[1]) * self._per_second)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True


@attrs.frozen(kw_only=True)
class Faults:
    """Faults the broker injects, for tests and demos. All off by default.

    Attributes:
        ack_delay: seconds before each ack is sent (sends are handled
            concurrently, so this adds latency, not a throughput cap).
        drop_ack_rate: probability that a send is accepted but never acked.
        transient_error_rate: probability of a transient error ack.
        disconnect_every: close a connection abruptly after this many sends.
        rate_limit: refuse a member's sends beyond this rate (`rate_limit`).
    """

    ack_delay: float = 0.0
    drop_ack_rate: float = 0.0
    transient_error_rate: float = 0.0
    disconnect_every: int = 0
    rate_limit: RateLimit | None = None


@attrs.frozen
class _Acceptance:
    """One send the broker took, to persist before it is acked."""

    mesh: str
    client_message_id: str
    fingerprint: str
    message_id: str
    target: str
    ack_id: Any  # the send frame's id, echoed in the ack
    previous: tuple[str, str] | None = None  # what was there before, for a copy (no dedupe)

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
    rate_limited: int = 0
    #: Sends accepted again under a new message id (compat mode: no dedupe).
    redelivered: int = 0
    #: Send frames it could not handle and so never answered (compat mode).
    unanswered: int = 0


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
        isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in m.items())
        for m in data.values()
    ):
        raise ConfigError(f"members file {path} must map mesh ids to {{member id: 64-hex pubkey}}")
    return data


class _Ledger:
    """What the broker accepted: (mesh, client id) -> (fingerprint, message id),
    and how many times (more than once only where it does not dedupe)."""

    def __init__(self, path: Path | None) -> None:
        self.entries: dict[tuple[str, str], tuple[str, str]] = {}
        self.copies: collections.Counter[tuple[str, str]] = collections.Counter()
        # Acceptances still being written: a resend of one must wait for it,
        # or we would ack a duplicate of something a crash could forget.
        self.unwritten: dict[tuple[str, str], trio.Event] = {}
        self._committer: GroupCommitter | None = None
        if path is not None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS accepted (mesh TEXT NOT NULL, client_message_id TEXT NOT NULL,"
                " fingerprint TEXT NOT NULL, message_id TEXT NOT NULL, target TEXT, received_at INTEGER,"
                " copies INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (mesh, client_message_id))"
            )
            if "copies" not in {c[1] for c in conn.execute("PRAGMA table_info(accepted)")}:  # older file
                conn.execute("ALTER TABLE accepted ADD COLUMN copies INTEGER NOT NULL DEFAULT 1")
            for mesh, cid, fp, mid, copies in conn.execute(
                "SELECT mesh, client_message_id, fingerprint, message_id, copies FROM accepted"
            ):
                self.entries[(mesh, cid)] = (fp, mid)
                self.copies[(mesh, cid)] = copies
            self._committer = GroupCommitter(conn, durable=False)

    @property
    def persistent(self) -> bool:
        return self._committer is not None

    async def record(self, a: _Acceptance) -> None:
        """Persist one acceptance before it is acked (concurrent calls share a commit)."""
        if self._committer is None:
            return
        row = (a.mesh, a.client_message_id, a.fingerprint, a.message_id, a.target, wall_clock_ms())

        def insert(conn: sqlite3.Connection) -> None:
            # A key already there is a copy accepted again (a broker that
            # does not dedupe): count it, keep the newest message id.
            conn.execute(
                "INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (mesh, client_message_id)"
                " DO UPDATE SET copies = copies + 1, message_id = excluded.message_id",
                row,
            )

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

    def copies(self) -> dict[tuple[str, str], int]:
        """(meshId, client_message_id) -> times accepted (1 where it dedupes)."""
        return dict(self.ledger.copies)


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
    compat: Compat | None = None,
    max_message_bytes: int = CLAUDEMESH_MAX_MESSAGE_BYTES,
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
        compat: ``"claudemesh"`` answers like the seed's real broker (see
            the module docstring); `max_payload` then does not apply.
        max_message_bytes: in compat mode, the most characters of
            ciphertext, nonce and target together (the real broker's 65,536).
    """
    if members is None and not open_mode:
        raise ConfigError("the broker needs a members file, or open mode")
    if compat not in (None, "claudemesh"):
        raise ConfigError(f"unknown compat mode {compat!r} (known: claudemesh)")
    try:
        ledger = await trio.to_thread.run_sync(_Ledger, None if db is None else Path(db))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the broker's database {db}: {exc}") from None
    server_state = BrokerServer(host, port, BrokerStatistics(), ledger, faults)
    handler = _Handler(server_state, dict(members or {}), open_mode, max_payload, compat, max_message_bytes)
    if receipts is not None:
        handler.receipts_fd = os.open(receipts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            server_state.port = await nursery.start(
                functools.partial(
                    serve_websocket,
                    handler.handle,
                    host,
                    port,
                    max_message_size=max(MAX_FRAME, 2 * max_payload),
                )
            )
            log.info("reference broker listening on %s", server_state.url)
            task_status.started(server_state)
    finally:
        await ledger.aclose()
        if handler.receipts_fd is not None:
            os.close(handler.receipts_fd)


class _Handler:
    def __init__(
        self,
        state: BrokerServer,
        members: dict[str, Mapping[str, str]],
        open_mode: bool,
        max_payload: int,
        compat: Compat | None = None,
        max_message_bytes: int = CLAUDEMESH_MAX_MESSAGE_BYTES,
    ) -> None:
        self.state = state
        self.stats = state.statistics
        self.members = members
        self.open_mode = open_mode
        self.max_payload = max_payload
        self.compat = compat
        self.max_message_bytes = max_message_bytes
        limit = state.faults.rate_limit
        self.buckets = None if limit is None else _Buckets(limit)
        self.rng = random.Random()
        self.receipts_fd: int | None = None

    async def handle(self, ws: ServerConnection) -> None:
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
        verdict = self._judge_hello(frame)
        if len(verdict) == 3:
            ws.send_message_nowait(json.dumps({"type": "hello_ack", "presenceId": random_uuid()}))
            return verdict[1], verdict[2]
        code, message = verdict[0], verdict[1]
        self.stats.hellos_rejected += 1
        ws.send_message_nowait(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.aclose(4001, code)
        return None

    def _judge_hello(self, frame: dict[str, Any] | None) -> tuple[str, str, str] | tuple[str, str]:
        """("ok", mesh id, member id) for a hello it admits, or the (code,
        message) refusing it."""
        if frame is None:
            return ("bad_hello", "malformed hello: not a JSON object")
        try:
            problem = self._check_hello(frame)
        except (ValueError, TypeError, KeyError) as exc:
            return ("bad_hello", f"malformed hello: {exc}")
        if problem is not None:
            return problem
        member = frame["memberId"] if frame.get("type") == "hello" else frame["parentMemberId"]
        return ("ok", str(frame["meshId"]), str(member))

    def _check_hello(self, f: dict[str, Any]) -> tuple[str, str] | None:
        now = wall_clock_ms()
        kind = f.get("type")
        if kind not in ("hello", "session_hello"):
            return ("bad_hello", "first frame must be hello or session_hello")
        mesh, ts, sig = f["meshId"], f["timestamp"], f["signature"]
        if (
            not isinstance(mesh, str)
            or not isinstance(ts, int)
            or isinstance(ts, bool)
            or not isinstance(sig, str)
        ):
            return ("bad_hello", "meshId, timestamp and signature have the wrong types")
        if abs(now - ts) > MAX_SKEW_MS:
            return ("timestamp_skew", f"timestamp is {abs(now - ts) // 1000}s off")
        if not isinstance(f.get("cwd"), str):
            return ("bad_hello", "cwd is required (the working directory, a string)")
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

    async def _serve(self, ws: ServerConnection, mesh: str, member: str) -> None:
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
                    ack, record = self._decide(mesh, member, frame)
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
        self,
        acks: _AckQueue,
        ack: dict[str, Any] | None,
        record: _Acceptance | None,
        wait_for: tuple[str, str] | None,
    ) -> None:
        """Persist an acceptance (sharing commits with concurrent ones), then ack.

        The write is shielded: a connection closing must not cancel the
        persistence of something already entered in the dedupe table.
        """
        ledger = self.state.ledger
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
        if ack is not None:
            acks.send(ack)

    def _decide(
        self, mesh: str, member: str, f: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, _Acceptance | None]:
        """The answer to one send, decided at once so racing resends dedupe.

        Returns the ack (None for none: a dropped one, or a frame the
        claudemesh broker could not handle) and, for a new acceptance on a
        persistent broker, the record to write before acking.
        """
        answer, record = self._answer(mesh, member, f)
        ack: dict[str, Any] | None = answer
        drop = self.state.faults.drop_ack_rate
        if ack is not None and ack.get("queued") and drop and self.rng.random() < drop:
            self.stats.dropped_acks += 1
            ack = None
        return ack, record

    def _answer(
        self, mesh: str, member: str, f: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, _Acceptance | None]:
        cid, fp = f.get("client_message_id"), f.get("request_fingerprint")
        ack_id = f.get("id", cid)
        faults = self.state.faults
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
        entries, key = self.state.ledger.entries, (mesh, cid)
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
        self.state.ledger.copies[key] += 1
        self.stats.accepted += 1
        ack = {"type": "ack", "id": ack_id, "messageId": message_id, "queued": True}
        if not self.state.ledger.persistent:
            return ack, None
        return ack, _Acceptance(mesh, cid, str(fp), message_id, str(f.get("targetSpec")), ack_id, known)

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
            return {"type": "ack", "id": ack_id, "messageId": "", "queued": False, "error": error}
        return _error(ack_id, error, code, permanent)


_ACK_TEMPLATE = '{"type":"ack","id":%s,"messageId":%s,"queued":true}'


def _encode_ack(frame: dict[str, Any]) -> str:
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


def _error(ack_id: Any, error: str, code: str, permanent: bool) -> dict[str, Any]:
    return {
        "type": "ack",
        "id": ack_id,
        "messageId": "",
        "queued": False,
        "error": error,
        "code": code,
        "permanent": permanent,
    }


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
