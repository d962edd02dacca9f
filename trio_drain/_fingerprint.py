"""Request fingerprints, byte-compatible with the seed's daemon."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import rfc8785

from ._errors import InvalidRequest

ENVELOPE_VERSION = 1
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON of `value`.

    Raises:
        InvalidRequest: `value` is not representable as JSON (a set, NaN, ...).
    """
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"meta is not JSON-serialisable: {exc}") from None


def derive_destination(target_spec: str) -> tuple[str, str]:
    """(destination_kind, destination_ref) implied by a target spec.

    `#x` is topic `x`, a 64-hex public key is a dm, anything else (`*`,
    `@group`, a name) is a topic named by the target itself.
    """
    if target_spec.startswith("#") and len(target_spec) > 1:
        return "topic", target_spec[1:]
    if _HEX64.fullmatch(target_spec):
        return "dm", target_spec
    return "topic", target_spec


_sha256 = hashlib.sha256


def request_fingerprint(
    *,
    destination_kind: str,
    destination_ref: str,
    payload: bytes,
    priority: str = "next",
    reply_to_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
    envelope_version: int = ENVELOPE_VERSION,
) -> bytes:
    """The sha256 request fingerprint of section 3 of the spec.

    ``sha256(version 0 kind 0 ref 0 reply_to 0 priority 0 canon(meta) 0
    sha256(body))`` with every string UTF-8 encoded.
    """
    # One string, one encode: the same bytes as encoding each part apart.
    head = f"{envelope_version}\x00{destination_kind}\x00{destination_ref}\x00{reply_to_id or ''}\x00{priority}\x00"
    canonical_meta = canonical_json(dict(meta)) if meta is not None else b""
    return _sha256(head.encode() + canonical_meta + b"\x00" + _sha256(payload).digest()).digest()
