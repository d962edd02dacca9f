"""Value objects passed around the library: requests, rows and outcomes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs


class Status(enum.StrEnum):
    """The five states of an outbox row (see the lifecycle module)."""

    PENDING = "pending"
    INFLIGHT = "inflight"
    DONE = "done"
    DEAD = "dead"
    ABORTED = "aborted"


class Priority(enum.StrEnum):
    """Delivery priority. Rows are claimed `now` first, then `next`, then `low`."""

    NOW = "now"
    NEXT = "next"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Claim order: lower ranks are claimed first."""
        return _PRIORITY_RANK[self]


#: The priorities as their wire text: anything else a broker cannot take.
PRIORITIES = frozenset(p.value for p in Priority)


_PRIORITY_RANK = {Priority.NOW: 0, Priority.NEXT: 1, Priority.LOW: 2}

#: The status values, in lifecycle order.
STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


class DestinationKind(enum.StrEnum):
    TOPIC = "topic"
    DM = "dm"
    QUEUE = "queue"


@attrs.frozen(kw_only=True)
class SendRequest:
    """What a host application asks the outbox to deliver.

    Only `payload` is required. `destination_kind` and `destination_ref` are
    derived from `target_spec` when omitted; `client_message_id` is minted
    when omitted. `nonce` and `ciphertext` (both base64 text) are sent as
    stored when the host encrypted the message itself.
    """

    payload: bytes
    mesh: str | None = None
    target_spec: str | None = None
    priority: str = "next"
    destination_kind: str | None = None
    destination_ref: str | None = None
    reply_to_id: str | None = None
    meta: Mapping[str, Any] | None = None
    client_message_id: str | None = None
    nonce: str | None = None
    ciphertext: str | None = None
    sender_session_pubkey: str | None = None
    #: Rows sharing a key go out one at a time, in the order they were
    #: accepted (an ordering lane). Not part of the fingerprint.
    ordering_key: str | None = None


@attrs.frozen(kw_only=True)
class OutboxRow:
    """One outbox row, every column under its schema name.

    Times are integer milliseconds since the epoch.
    """

    id: str
    client_message_id: str
    request_fingerprint: bytes
    payload: bytes
    enqueued_at: int
    attempts: int
    next_attempt_at: int
    status: Status
    last_error: str | None = None
    delivered_at: int | None = None
    broker_message_id: str | None = None
    aborted_at: int | None = None
    aborted_by: str | None = None
    superseded_by: str | None = None
    mesh: str | None = None
    target_spec: str | None = None
    nonce: str | None = None
    ciphertext: str | None = None
    priority: str | None = None
    sender_session_pubkey: str | None = None
    lease_expires_at: int | None = None
    lease_token: str | None = None
    ordering_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: bytes become hex (fingerprint) or text."""
        d = attrs.asdict(self, recurse=False)
        d["status"] = self.status.value
        d["request_fingerprint"] = self.request_fingerprint.hex()
        try:
            d["payload"] = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            d["payload"] = None
            d["payload_hex"] = self.payload.hex()
        d["lease_token"] = None if self.lease_token is None else "<set>"
        return d


class NewRow(NamedTuple):
    """A row `accept` is about to insert: the columns a new row sets, in
    column order, as a plain tuple (status as its text). Every other column
    of `OutboxRow` starts NULL.

    Internal: building one costs a fraction of an attrs instance, and it is
    the insert's parameters as it stands (binding only these columns, not
    all of them, is a quarter of the insert's cost). `accept_many` builds
    one per row.
    """

    id: str
    client_message_id: str
    request_fingerprint: bytes
    payload: bytes
    enqueued_at: int
    attempts: int
    next_attempt_at: int
    status: str
    mesh: str | None
    target_spec: str | None
    nonce: str | None
    ciphertext: str | None
    priority: str | None
    sender_session_pubkey: str | None
    ordering_key: str | None


class OutcomeKind(enum.StrEnum):
    ACCEPTED_PENDING = "accepted_pending"
    ACCEPTED_INFLIGHT = "accepted_inflight"
    ACCEPTED_DONE = "accepted_done"
    CONFLICT = "conflict"


@attrs.frozen(kw_only=True)
class AcceptOutcome:
    """The answer to `accept`: what the outbox did with the request.

    Attributes:
        kind: one of `accepted_pending`, `accepted_inflight`, `accepted_done`,
            `conflict`.
        code: the HTTP-style status code (202, 200 or 409).
        client_message_id: the request's id (minted if the caller gave none).
        row_id: the id of the outbox row holding that client_message_id.
        reason: why a conflict is one, e.g. `outbox_dead_fingerprint_match`.
        fingerprint_prefix: on conflicts, the first 8 bytes (hex) of the stored
            row's fingerprint.
        broker_message_id: the broker's id, where one is known.
        inserted: whether this call wrote a new row.
    """

    kind: OutcomeKind
    code: int
    client_message_id: str
    row_id: str | None = None
    reason: str | None = None
    fingerprint_prefix: str | None = None
    broker_message_id: str | None = None
    inserted: bool = False

    @property
    def accepted(self) -> bool:
        return self.kind is not OutcomeKind.CONFLICT
