"""Judging a hello: which member a first frame admits, or why it is refused.

Both kinds are verified: a member's hello (its signature) and a session's
(the session's signature, the parent's attestation of the session key and
its expiry), then the clock skew, `cwd` and membership. No I/O: the
connection handler sends the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._brokers import _identity
from .._clock import wall_clock_ms

#: How far a hello's timestamp may be from the broker's clock, in ms.
MAX_SKEW_MS = 60_000

#: ("ok", mesh id, member id) for a hello admitted, or (code, message) refusing it.
Verdict = tuple[str, str, str] | tuple[str, str]


def judge_hello(
    frame: dict[str, Any] | None, members: Mapping[str, Mapping[str, str]], open_mode: bool
) -> Verdict:
    """("ok", mesh id, member id) for a hello it admits, or the (code,
    message) refusing it.

    Args:
        frame: the first frame, parsed (None: not a JSON object).
        members: mesh id -> {member id -> pubkey hex}.
        open_mode: admit any correctly signed hello, member or not.
    """
    if frame is None:
        return ("bad_hello", "malformed hello: not a JSON object")
    try:
        problem = _check_hello(frame, members, open_mode)
    except (ValueError, TypeError, KeyError) as exc:
        return ("bad_hello", f"malformed hello: {exc}")
    if problem is not None:
        return problem
    member = frame["memberId"] if frame.get("type") == "hello" else frame["parentMemberId"]
    return ("ok", str(frame["meshId"]), str(member))


def _check_hello(
    f: dict[str, Any], members: Mapping[str, Mapping[str, str]], open_mode: bool
) -> tuple[str, str] | None:
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
        return _check_member(mesh, member, pubkey, members, open_mode)
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
    return _check_member(mesh, parent, parent_key, members, open_mode)


def _check_member(
    mesh: str, member: Any, pubkey: Any, members: Mapping[str, Mapping[str, str]], open_mode: bool
) -> tuple[str, str] | None:
    if open_mode:
        return None
    known = members.get(mesh, {}).get(member)
    if known is None or known != pubkey:
        return ("not_a_member", f"{member} is not a member of {mesh} with that key")
    return None
