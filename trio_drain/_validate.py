"""Validation of SendRequests, before anything is written."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from ._brokers._wire import NONCE_CHARS, send_frame_size
from ._errors import InvalidRequest
from ._fingerprint import canonical_json, derive_destination, request_fingerprint
from ._ids import uuid7
from ._model import PRIORITIES, DestinationKind, NewRow, Priority, SendRequest

DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: The real broker refuses a send whose ciphertext, nonce and target
#: together exceed this many characters (section 3 of the spec).
DEFAULT_MAX_MESSAGE_BYTES = 65_536
MAX_ID_LENGTH = 256
#: SPEC section 10: an ordering key is any non-empty string up to 256 characters.
MAX_ORDERING_KEY_LENGTH = 256
MAX_TARGET_LENGTH = 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Controls (C0, DEL, C1), bidi embeddings, overrides, isolates and marks,
# and line separators have no place in an id, a mesh or a target: they
# would reorder or rewrite what an operator reads.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_new_row = NewRow._make
_KINDS = frozenset(k.value for k in DestinationKind)


def _text(name: str, value: object, *, max_length: int, optional: bool = True) -> str | None:
    if value is None:
        if optional:
            return None
        raise InvalidRequest(f"{name} is required")
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > max_length:
        raise InvalidRequest(f"{name} is longer than {max_length} characters")
    if _CONTROL.search(value):
        raise InvalidRequest(f"{name} must not contain control or bidi characters")
    _utf8(name, value)
    return value


def _utf8(name: str, value: str) -> None:
    """Refuse text that has no UTF-8 form (a lone surrogate such as "\\ud800"):
    the database driver could not store it. `isascii` is a flag read, so
    ASCII text, the usual case, is never encoded here."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"{name} is not valid Unicode text (character {exc.start} is a lone surrogate"
                " with no UTF-8 form)"
            ) from None


def _base64(name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{name} must be base64 text") from None


def prepare_row(
    req: SendRequest,
    *,
    now: int,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    row_id: str | None = None,
) -> NewRow:
    """Validate `req` and build the pending row `accept` would insert.

    `row_id` is the new row's id (a fresh UUIDv7 when omitted). A request
    whose send frame could never fit the broker's limit
    (`max_message_bytes` of ciphertext, nonce and target) is refused here
    rather than retried until it dies.

    Raises:
        InvalidRequest: the request is malformed; nothing has been written.
    """
    if not isinstance(req, SendRequest):
        raise InvalidRequest(f"expected a SendRequest, got {type(req).__name__}")
    if not isinstance(req.payload, (bytes, bytearray, memoryview)):
        raise InvalidRequest(f"payload must be bytes, got {type(req.payload).__name__}")
    payload = bytes(req.payload)
    if len(payload) > max_payload:
        raise InvalidRequest(f"payload is {len(payload)} bytes, over the {max_payload}-byte limit")
    priority = req.priority.value if isinstance(req.priority, Priority) else req.priority
    if not isinstance(priority, str) or priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of now, next, low; got {req.priority!r}")
    mesh = _text("mesh", req.mesh, max_length=MAX_ID_LENGTH)
    target_spec = _text("target_spec", req.target_spec, max_length=MAX_TARGET_LENGTH)
    reply_to_id = _text("reply_to_id", req.reply_to_id, max_length=MAX_ID_LENGTH)
    client_message_id = _text("client_message_id", req.client_message_id, max_length=MAX_ID_LENGTH)
    ordering_key = _text("ordering_key", req.ordering_key, max_length=MAX_ORDERING_KEY_LENGTH)

    kind, ref = req.destination_kind, req.destination_ref
    if (kind is None) != (ref is None):
        raise InvalidRequest("destination_kind and destination_ref go together")
    if kind is None or ref is None:
        kind, ref = derive_destination(target_spec if target_spec is not None else "*")
    else:
        kind = kind.value if isinstance(kind, DestinationKind) else kind
        if not isinstance(kind, str) or kind not in _KINDS:
            raise InvalidRequest(f"destination_kind must be topic, dm or queue; got {kind!r}")
        _text("destination_ref", ref, max_length=MAX_TARGET_LENGTH, optional=False)

    if req.meta is not None:
        if not isinstance(req.meta, Mapping):
            raise InvalidRequest(f"meta must be a JSON object, got {type(req.meta).__name__}")
        canonical_json(dict(req.meta))  # raises InvalidRequest

    if (req.nonce is None) != (req.ciphertext is None):
        raise InvalidRequest("nonce and ciphertext go together")
    _base64("nonce", _text("nonce", req.nonce, max_length=1024))
    if req.ciphertext is not None:
        if not isinstance(req.ciphertext, str):
            raise InvalidRequest("ciphertext must be base64 text")
        _utf8("ciphertext", req.ciphertext)
        _base64("ciphertext", req.ciphertext)
        if len(req.ciphertext) > 2 * max_payload:
            raise InvalidRequest(f"ciphertext is over the {max_payload}-byte limit")
        if target_spec is None:
            raise InvalidRequest("a request with ciphertext needs a target_spec")
    size = send_frame_size(
        target_spec=target_spec, payload_size=len(payload), nonce=req.nonce, ciphertext=req.ciphertext
    )
    if size > max_message_bytes:
        raise InvalidRequest(
            f"the send frame would carry {size} characters of ciphertext, nonce and target, over the"
            f" broker's limit of {max_message_bytes} (max_message_bytes): a payload of about"
            f" {3 * (max_message_bytes - NONCE_CHARS - 64) // 4} bytes fits"
        )
    session = req.sender_session_pubkey
    if session is not None and (not isinstance(session, str) or not _HEX64.fullmatch(session)):
        raise InvalidRequest("sender_session_pubkey must be 64 lowercase hex characters")

    fingerprint = request_fingerprint(
        destination_kind=kind,
        destination_ref=ref,
        payload=payload,
        priority=priority,
        reply_to_id=reply_to_id,
        meta=req.meta,
    )
    # Positionally, in NewRow's field order: the keyword constructor costs
    # more than the rest of the row's preparation.
    return _new_row(
        (
            row_id if row_id is not None else uuid7(),  # id
            client_message_id if client_message_id is not None else uuid7(),
            fingerprint,
            payload,
            now,
            0,
            now,
            "pending",  # enqueued_at, attempts, next_attempt_at, status
            mesh,
            target_spec,
            req.nonce,
            req.ciphertext,
            priority,
            session,
            ordering_key,
        )
    )
