"""Builders for the values the tests pass around: requests, send frames,
rows, broker identities. One function each, with the defaults most tests
want; a test states what it cares about by keyword.

Plain values, no I/O and no hypothesis: the strategies are in
tests/strategies.py, the doubles and waits in tests/helpers.py.
"""

from __future__ import annotations

from typing import Any

import attrs

from trio_drain import (
    MeshIdentity,
    OutboxRow,
    OutgoingMessage,
    SendRequest,
    SessionIdentity,
    Status,
    generate_secret_key,
)

#: A max_age no test row reaches.
BIG = 10**12


def req(cid: str, **fields: Any) -> SendRequest:
    """A valid request for mesh "alpha", channel "#t", its payload its id.

    Any other field, or another value for these, by keyword.
    """
    defaults: dict[str, Any] = {
        "mesh": "alpha",
        "target_spec": "#t",
        "payload": cid.encode(),
        "client_message_id": cid,
    }
    return SendRequest(**{**defaults, **fields})


def message(cid: str = "m-1", **fields: Any) -> OutgoingMessage:
    """A well-formed send frame, a broadcast at priority "next"."""
    defaults: dict[str, Any] = {
        "client_message_id": cid,
        "request_fingerprint": "ab" * 32,
        "target_spec": "*",
        "priority": "next",
        "nonce": "A" * 32,
        "ciphertext": "aGk=",
    }
    return OutgoingMessage(**{**defaults, **fields})


def claimed_row(**changes: Any) -> OutboxRow:
    """A row as a claim leaves it: inflight under lease "t", its first
    attempt, for mesh "alpha" and channel "#general" at priority "now"."""
    row = OutboxRow(
        id="r1",
        client_message_id="m-1",
        request_fingerprint=bytes(range(32)),
        payload=b"hello",
        enqueued_at=0,
        attempts=1,
        next_attempt_at=0,
        status=Status.INFLIGHT,
        lease_token="t",
        lease_expires_at=60_000,
        mesh="alpha",
        target_spec="#general",
        priority="now",
    )
    return attrs.evolve(row, **changes)


#: The secret keys of the member "member-1" of "mesh-alpha", and of a
#: session it attests; one pair for the whole run.
PARENT = generate_secret_key()
SESSION = generate_secret_key()


def mesh_identity(secret: str = PARENT, member: str = "member-1") -> MeshIdentity:
    """A member of "mesh-alpha" (by default "member-1", with `PARENT`'s key)."""
    return MeshIdentity(mesh_id="mesh-alpha", member_id=member, secret_key=secret)


def session_identity(
    session_secret: str = SESSION, *, mesh: str = "mesh-alpha", member: str = "member-1"
) -> SessionIdentity:
    """A session of "member-1" of "mesh-alpha", attested with `PARENT`'s key."""
    return SessionIdentity(
        mesh_id=mesh,
        parent_member_id=member,
        parent_secret_key=PARENT,
        session_secret_key=session_secret,
    )
