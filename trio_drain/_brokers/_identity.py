"""Who a connection says it is: mesh and session identities, their keys and signatures.

Secret keys are 128 hex characters in libsodium's layout: the 32-byte seed
followed by the 32-byte public key. Signatures are detached ed25519 (PyNaCl).
An identity signs its hello; what the hello frame looks like, and which
text the signature covers, is `_wire`'s.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .._errors import ConfigError
from . import _wire
from ._wire import ATTEST_PREFIX as ATTEST_PREFIX
from ._wire import SESSION_HELLO_PREFIX as SESSION_HELLO_PREFIX

ATTESTATION_LIFETIME_MS = 12 * 3600 * 1000


def signing_key(secret_hex: str, *, what: str = "secret key") -> SigningKey:
    """Parse a 128-hex libsodium secret key, checking its public half.

    Raises:
        ConfigError: malformed, or the public half does not match the seed.
    """
    if not isinstance(secret_hex, str):
        raise ConfigError(f"{what} must be a hex string")
    text = secret_hex.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} is not hex") from None
    if len(raw) != 64:
        raise ConfigError(f"{what} must be 128 hex characters (seed + public key), got {len(text)}")
    key = SigningKey(raw[:32])
    if bytes(key.verify_key) != raw[32:]:
        raise ConfigError(f"{what} is inconsistent: its public half does not match its seed")
    return key


def generate_secret_key() -> str:
    """A fresh 128-hex secret key (seed + public key)."""
    key = SigningKey.generate()
    return (bytes(key) + bytes(key.verify_key)).hex()


def public_key_hex(secret_hex: str) -> str:
    return bytes(signing_key(secret_hex).verify_key).hex()


def sign(key: SigningKey, text: str) -> str:
    return key.sign(text.encode()).signature.hex()


def verify(pubkey_hex: str, text: str, signature_hex: str) -> bool:
    """Whether `signature_hex` is pubkey's ed25519 signature of `text`."""
    try:
        VerifyKey(bytes.fromhex(pubkey_hex)).verify(text.encode(), bytes.fromhex(signature_hex))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def session_id(pubkey: str) -> str:
    """The hello's `sessionId`: stable for the life of the process and the key.

    The real broker recognises a reconnect of the same process by it (the
    seed's daemon sends `daemon-<pid>`); a fresh value per connect leaves a
    ghost presence for 90 s and tells the mesh a peer joined. Two connections
    of one process in one mesh (a member's and a session's) must not share
    it, or the broker takes the second for a reconnect of the first and
    closes that: hence the key in it.
    """
    return f"trio-drain-{os.getpid()}-{pubkey[:16]}"


def _working_directory() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed under us: the broker needs a string, not the truth
        return "/"


def _process_fields(pubkey: str) -> dict[str, Any]:
    """The fields both hellos carry about this process.

    `cwd` is required: the real broker's presence row needs it, and without
    it the broker never answers the hello at all.
    """
    return {
        "sessionId": session_id(pubkey),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "cwd": _working_directory(),
    }


@attrs.frozen(kw_only=True, repr=False)
class MeshIdentity:
    """A mesh member: who a mesh connection says it is.

    The secret key never appears in a repr, a log line or an error message.
    """

    mesh_id: str
    member_id: str
    secret_key: str
    display_name: str | None = None
    _key: SigningKey = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_key", signing_key(self.secret_key, what="mesh secret_key"))

    def __repr__(self) -> str:
        return f"MeshIdentity(mesh_id={self.mesh_id!r}, member_id={self.member_id!r}, pubkey={self.pubkey[:12]}…)"

    @property
    def pubkey(self) -> str:
        return bytes(self._key.verify_key).hex()

    def hello(self, now_ms: int) -> dict[str, Any]:
        """The signed `hello` frame for a connection opened at `now_ms`."""
        signed = _wire.mesh_hello_text(self.mesh_id, self.member_id, self.pubkey, now_ms)
        return _wire.mesh_hello(
            mesh_id=self.mesh_id,
            member_id=self.member_id,
            pubkey=self.pubkey,
            timestamp=now_ms,
            signature=sign(self._key, signed),
            process=_process_fields(self.pubkey),
            display_name=self.display_name,
        )


@attrs.frozen(kw_only=True, repr=False)
class SessionIdentity:
    """A session key attested by its parent member, for a session connection."""

    mesh_id: str
    parent_member_id: str
    parent_secret_key: str
    session_secret_key: str
    _parent: SigningKey = attrs.field(init=False, eq=False)
    _session: SigningKey = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_parent", signing_key(self.parent_secret_key, what="parent_secret_key"))
        object.__setattr__(self, "_session", signing_key(self.session_secret_key, what="session_secret_key"))

    def __repr__(self) -> str:
        return (
            f"SessionIdentity(mesh_id={self.mesh_id!r}, parent_member_id={self.parent_member_id!r},"
            f" session_pubkey={self.session_pubkey[:12]}…)"
        )

    @property
    def parent_pubkey(self) -> str:
        return bytes(self._parent.verify_key).hex()

    @property
    def session_pubkey(self) -> str:
        return bytes(self._session.verify_key).hex()

    def attestation(self, now_ms: int) -> dict[str, Any]:
        """A fresh parent attestation of the session key (12 h lifetime)."""
        expires = now_ms + ATTESTATION_LIFETIME_MS
        signed = _wire.attestation_text(self.parent_pubkey, self.session_pubkey, expires)
        return _wire.attestation(
            parent_pubkey=self.parent_pubkey,
            session_pubkey=self.session_pubkey,
            expires_at=expires,
            signature=sign(self._parent, signed),
        )

    def hello(self, now_ms: int) -> dict[str, Any]:
        """The signed `session_hello` frame, with an attestation minted now."""
        signed = _wire.session_hello_text(self.mesh_id, self.parent_pubkey, self.session_pubkey, now_ms)
        return _wire.session_hello(
            mesh_id=self.mesh_id,
            parent_member_id=self.parent_member_id,
            parent_pubkey=self.parent_pubkey,
            session_pubkey=self.session_pubkey,
            parent_attestation=self.attestation(now_ms),
            timestamp=now_ms,
            signature=sign(self._session, signed),
            process=_process_fields(self.session_pubkey),
        )


Identity = MeshIdentity | SessionIdentity
