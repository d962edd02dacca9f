"""The wire protocol's frames, as pure functions (section 5 of the spec).

Every frame the drain and a broker exchange is built or read here:

- the hellos (`mesh_hello`, `session_hello`, with the parent's
  `attestation`) and the texts their signatures cover (`mesh_hello_text`,
  `session_hello_text`, `attestation_text`), and what the broker's answer
  to a hello says (`hello_answer`);
- what a row goes out as (`outgoing_message`, the `send` frame's text);
- what a broker's `ack` means (`classify_ack`);
- reading any frame safely (`parse_frame`).

No I/O and no keys: the identities (`_identity`) sign the texts, the
connection (`_websocket`) and the reference broker send and read frames.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from .._display import bounded
from .._ids import random_bytes
from .._model import PRIORITIES, OutboxRow

#: A row the host did not encrypt goes out with a fresh nonce of this many
#: bytes, in base64 this many characters.
NONCE_BYTES = 24
NONCE_CHARS = 4 * ((NONCE_BYTES + 2) // 3)

#: The largest frame either end takes.
MAX_FRAME = 4 * 1024 * 1024

# One compact encoder, built once: json.dumps with non-default separators
# builds a new encoder on every call, which shows on the send path.
encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A JSON string literal, quotes included, escaped as encode_json escapes it.
json_string: Callable[[str], str] = (
    getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
)
_SEND_TEMPLATE = (
    '{"type":"send","id":%s,"client_message_id":%s,"request_fingerprint":%s,"targetSpec":%s,'
    '"priority":%s,"nonce":%s,"ciphertext":%s}'
)


@attrs.frozen(kw_only=True)
class OutgoingMessage:
    """One `send` frame's worth of data (section 5 of the spec)."""

    client_message_id: str
    request_fingerprint: str  # hex
    target_spec: str
    priority: str
    nonce: str
    ciphertext: str

    def to_json(self) -> str:
        """The `send` frame as compact JSON text (the same text as
        ``encode_json(self.to_frame())``, built from a template: this runs
        once per row sent)."""
        cid = json_string(self.client_message_id)
        return _SEND_TEMPLATE % (
            cid,
            cid,
            json_string(self.request_fingerprint),
            json_string(self.target_spec),
            json_string(self.priority),
            json_string(self.nonce),
            json_string(self.ciphertext),
        )

    def to_frame(self) -> dict[str, object]:
        return {
            "type": "send",
            "id": self.client_message_id,
            "client_message_id": self.client_message_id,
            "request_fingerprint": self.request_fingerprint,
            "targetSpec": self.target_spec,
            "priority": self.priority,
            "nonce": self.nonce,
            "ciphertext": self.ciphertext,
        }


@attrs.frozen(kw_only=True)
class SendResult:
    """A broker's answer to one send.

    Build with `SendResult.acked`, `failed`, `throttled` or `no_answer`.


    Attributes:
        ok: the broker took the message (`message_id` names it there).
        duplicate: ... as a resend of one it already had.
        error, code: why not, as the broker put it.
        permanent: the broker will never take this message.
        rate_limited: back-pressure (a rate limit, an overload), not a
            failure: the row loses no attempt and its route is paced.
        unanswered: no answer came (ack deadline, lost connection): the
            frame may or may not have reached the broker.
    """

    ok: bool
    message_id: str | None = None
    duplicate: bool = False
    error: str | None = None
    code: str | None = None
    permanent: bool = False
    rate_limited: bool = False
    unanswered: bool = False

    @classmethod
    def acked(cls, message_id: str, *, duplicate: bool = False) -> SendResult:
        return cls(ok=True, message_id=message_id, duplicate=duplicate)

    @classmethod
    def failed(cls, error: str, *, permanent: bool, code: str | None = None) -> SendResult:
        return cls(ok=False, error=error, permanent=permanent, code=code)

    @classmethod
    def throttled(cls, error: str, *, code: str | None = None) -> SendResult:
        """The broker refused for now to protect itself: slow down, lose nothing."""
        return cls(ok=False, error=error, code=code, rate_limited=True)

    @classmethod
    def no_answer(cls, reason: str) -> SendResult:
        """The frame may have left, but no answer came (`ack_timeout`,
        `broker_disconnected`): its fate at the broker is unknown."""
        return cls(ok=False, error=reason, unanswered=True)


#: Error texts that mean "never": the real broker's acks carry no
#: `permanent` field, so its words decide (`payload too large: ...`,
#: `blocked by recipient grants (...)`).
PERMANENT_TEXT = re.compile(
    r"payload[_ ]too[_ ]large|forbidden|not_found|invalid|schema|auth|signature|blocked by recipient grants",
    re.I,
)
#: Back-pressure: a rate limit or an overload is "not now", never a failure.
RATE_LIMIT_CODES = frozenset({"rate_limit", "rate_limited", "overloaded"})
RATE_LIMIT_TEXT = re.compile(r"rate[_ ]limit|overloaded", re.I)
_NOT_QUEUED = "not_queued"


def classify_ack(frame: dict[str, Any]) -> SendResult:
    """The SendResult an `ack` frame stands for (section 5 of the spec).

    An ack is an error when it carries an `error` or says `queued: false`.
    An error is permanent if the frame says `"permanent": true`. Otherwise
    a rate limit (`rate_limit`, `overloaded`, by code or by text) is
    back-pressure (the worker paces the route for `rate_limit` and narrows
    its window for `overloaded`); without a `permanent` field (the real broker) an error
    is permanent when its text (before any parenthesis) matches
    `PERMANENT_TEXT`; anything else is transient.
    """
    error = frame.get("error")
    if not error and frame.get("queued", True) is not False:
        return SendResult.acked(str(frame.get("messageId") or ""), duplicate=frame.get("duplicate") is True)
    # Kept inert and bounded: it goes into last_error, logs and terminals.
    text = bounded(str(error or _NOT_QUEUED))
    raw_code = frame.get("code")
    code = None if raw_code is None else bounded(str(raw_code), 64)
    permanent = frame.get("permanent")
    if permanent is True:  # the broker's word: never, whatever the text says
        return SendResult.failed(text, permanent=True, code=code)
    # The real broker adds an explanation in parentheses, which may quote
    # the sender's own words (a target named "oauth-bot"): judge the error
    # by what comes before it.
    head = text.split(" (", 1)[0]
    if code in RATE_LIMIT_CODES or RATE_LIMIT_TEXT.search(head):
        return SendResult.throttled(text, code=code)
    if not isinstance(permanent, bool):
        permanent = bool(PERMANENT_TEXT.search(head))
    return SendResult.failed(text, permanent=permanent, code=code)


def unsendable(row: OutboxRow) -> str | None:
    """Why `row` can never go out, or None.

    The real broker sends no answer at all to a frame its handler cannot
    take (a priority outside the three, no target): such a frame must never
    leave, or it would only time out and be retried until it died. Accept
    validates new rows; this catches rows written by other software (the
    seed's daemon's, or edited by hand).
    """
    if row.target_spec is not None and (row.priority or "next") not in PRIORITIES:
        return f"invalid_row: priority {row.priority!r} is not now, next or low"
    if row.target_spec is not None and not row.target_spec:
        return "invalid_row: empty target_spec"
    return None


def js_length(text: str) -> int:
    """`text.length` as the broker (JavaScript) counts it: UTF-16 code units."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2


def send_frame_size(
    *, target_spec: str | None, payload_size: int, nonce: str | None, ciphertext: str | None
) -> int:
    """Characters of ciphertext, nonce and target in the row's send frame
    (what the real broker measures against its limit), as
    `outgoing_message` builds it."""
    if target_spec is not None and nonce is not None and ciphertext is not None:
        return len(ciphertext) + len(nonce) + js_length(target_spec)
    return (
        4 * ((payload_size + 2) // 3)
        + NONCE_CHARS
        + js_length(target_spec if target_spec is not None else "*")
    )


def outgoing_message(row: OutboxRow) -> OutgoingMessage:
    """The frame a row goes out as.

    Rows with no target_spec (legacy rows of the seed's daemon) go out as a
    broadcast; rows the host did not encrypt carry their payload in base64
    with a fresh nonce; encrypted rows carry their stored nonce and
    ciphertext.
    """
    if row.target_spec is None:
        target, priority = "*", "next"
    else:
        target, priority = row.target_spec, row.priority or "next"
    if row.target_spec is not None and row.ciphertext is not None and row.nonce is not None:
        nonce, ciphertext = row.nonce, row.ciphertext
    else:
        nonce = base64.b64encode(random_bytes(NONCE_BYTES)).decode()
        ciphertext = base64.b64encode(row.payload).decode()
    return OutgoingMessage(
        client_message_id=row.client_message_id,
        request_fingerprint=row.request_fingerprint.hex(),
        target_spec=target,
        priority=priority,
        nonce=nonce,
        ciphertext=ciphertext,
    )


def parse_frame(raw: str | bytes) -> dict[str, Any] | None:
    """A text frame's JSON object, or None for anything else.

    Never raises: not JSON, not an object, binary, or nested past the
    interpreter's recursion limit (a hostile peer's cheapest trick) are all
    just None.
    """
    if not isinstance(raw, str):
        return None
    try:
        try:
            frame, end = _raw_decode(raw)
        except ValueError:  # leading whitespace, or not JSON: json.loads decides
            end = -1
        if end != len(raw):  # ... and on anything after the value
            frame = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return frame if isinstance(frame, dict) else None


# `json.loads` strips whitespace with two regular expressions around the
# decode, more than half its time on a frame this size.
_raw_decode = json.JSONDecoder().raw_decode


# -- the hello ------------------------------------------------------------------------------------

#: The first field of the text a parent's attestation of a session key signs.
ATTEST_PREFIX = "claudemesh-session-attest"
#: The first field of the text a session's hello signs.
SESSION_HELLO_PREFIX = "claudemesh-session-hello"


def mesh_hello_text(mesh_id: str, member_id: str, pubkey: str, timestamp: int) -> str:
    """The text a member's `hello` signature covers."""
    return f"{mesh_id}|{member_id}|{pubkey}|{timestamp}"


def attestation_text(parent_pubkey: str, session_pubkey: str, expires_at: int) -> str:
    """The text a parent's attestation of a session key covers."""
    return f"{ATTEST_PREFIX}|{parent_pubkey}|{session_pubkey}|{expires_at}"


def session_hello_text(mesh_id: str, parent_pubkey: str, session_pubkey: str, timestamp: int) -> str:
    """The text a session's `session_hello` signature covers."""
    return f"{SESSION_HELLO_PREFIX}|{mesh_id}|{parent_pubkey}|{session_pubkey}|{timestamp}"


def mesh_hello(
    *,
    mesh_id: str,
    member_id: str,
    pubkey: str,
    timestamp: int,
    signature: str,
    process: Mapping[str, Any],
    display_name: str | None,
) -> dict[str, Any]:
    """A member's `hello` frame.

    Args:
        mesh_id: the mesh it joins.
        member_id: the member it is.
        pubkey: the member's public key (hex).
        timestamp: when it was made, in ms since the epoch.
        signature: the member's signature of `mesh_hello_text` (hex).
        process: the fields about this process every hello carries
            (``sessionId``, ``pid``, ``hostname``, ``cwd``).
        display_name: how the mesh shows it; None for ``trio-drain@<hostname>``.
    """
    return {
        "type": "hello",
        "meshId": mesh_id,
        "memberId": member_id,
        "pubkey": pubkey,
        "timestamp": timestamp,
        "signature": signature,
        **process,
        "peerType": "ai",
        "channel": "trio-drain",
        "displayName": display_name or f"trio-drain@{process['hostname']}",
    }


def attestation(
    *, parent_pubkey: str, session_pubkey: str, expires_at: int, signature: str
) -> dict[str, Any]:
    """A parent's attestation of a session key, as a `session_hello` carries it.

    `signature` is the parent's signature of `attestation_text` (hex).
    """
    return {
        "sessionPubkey": session_pubkey,
        "parentMemberPubkey": parent_pubkey,
        "expiresAt": expires_at,
        "signature": signature,
    }


def session_hello(
    *,
    mesh_id: str,
    parent_member_id: str,
    parent_pubkey: str,
    session_pubkey: str,
    parent_attestation: dict[str, Any],
    timestamp: int,
    signature: str,
    process: Mapping[str, Any],
) -> dict[str, Any]:
    """A session's `session_hello` frame.

    Args:
        mesh_id: the mesh it joins.
        parent_member_id: the member the session belongs to.
        parent_pubkey: that member's public key (hex).
        session_pubkey: the session's public key (hex).
        parent_attestation: the parent's `attestation` of the session key.
        timestamp: when it was made, in ms since the epoch.
        signature: the session's signature of `session_hello_text` (hex).
        process: the fields about this process every hello carries.
    """
    return {
        "type": "session_hello",
        "meshId": mesh_id,
        "parentMemberId": parent_member_id,
        "parentMemberPubkey": parent_pubkey,
        "sessionPubkey": session_pubkey,
        "parentAttestation": parent_attestation,
        "timestamp": timestamp,
        "signature": signature,
        **process,
    }


HelloAnswer = tuple[Literal["accepted", "refused"], str]


def hello_answer(frame: dict[str, Any]) -> HelloAnswer | None:
    """What a frame that came after our hello says about it.

    ``("accepted", presence id)`` for a ``hello_ack``, ``("refused", "code:
    message")`` for an ``error``, None for any other frame (a push that
    came before the answer). The broker's words are kept inert and bounded:
    they go into last_error and logs.
    """
    kind = frame.get("type")
    if kind == "hello_ack":
        return ("accepted", bounded(str(frame.get("presenceId", "")), 80))
    if kind == "error":
        code = bounded(str(frame.get("code", "error")), 64)
        message = bounded(str(frame.get("message", "")), 300)
        return ("refused", f"{code}: {message}")
    return None
