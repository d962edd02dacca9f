"""Sortable ids (UUIDv7, RFC 9562) for rows and minted client message ids."""

from __future__ import annotations

import os
import threading

from ._clock import wall_clock_ms

_lock = threading.Lock()
_last = 0


def uuid7() -> str:
    """A new UUIDv7 as text; strictly increasing within this process.

    The 48-bit millisecond timestamp leads, then 74 bits that count up
    from a random start within a millisecond, so ids sort by creation time.
    """
    return uuid7s(1)[0]


def uuid7s(count: int) -> list[str]:
    """`count` new UUIDv7s, in increasing order.

    The first carries 74 random bits below the timestamp; the rest of the
    batch counts up from it (RFC 9562's monotonic counter), so a batch costs
    one random read and no comparison per id.
    """
    global _last
    with _lock:
        first = (wall_clock_ms() << 74) | int.from_bytes(random_bytes(10), "big") >> 6
        if first <= _last:
            first = _last + 1
        _last = first + count - 1
    if count == 1:  # one accept, one id
        return [_format(first)]
    # Ids of a batch share everything but their low 48 bits (the last 12 hex
    # digits) until those wrap: format the shared head once.
    head = _format(first)[:-12]
    high = first >> 48
    return [
        head + f"{v & 0xFFFFFFFFFFFF:012x}" if v >> 48 == high else _format(v)
        for v in range(first, first + count)
    ]


def _format(candidate: int) -> str:
    """UUIDv7 text for a 48-bit timestamp and 74 counter bits (`candidate`),
    with the version and variant bits set; by hand, since uuid.UUID() is
    most of the cost."""
    ms, rand = candidate >> 74, candidate & 0x3FFFFFFFFFFFFFFFFFF
    return (
        f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-{0x7000 | rand >> 62:04x}-"
        f"{0x8000 | (rand >> 48) & 0x3FFF:04x}-{rand & 0xFFFFFFFFFFFF:012x}"
    )


def random_uuid() -> str:
    """A random UUID (version 4) as text, from the pooled random bytes
    (`uuid.uuid4()` reads the OS's source once per id, and builds an object)."""
    h = random_bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def new_token() -> str:
    """An unguessable lease token."""
    return random_bytes(12).hex()


class _RandomPool(threading.local):
    """Bytes from the OS's random source, read 4 KiB at a time, one pool
    per thread (no slice is ever handed out twice).

    One system call per 4 KiB rather than one per message sent (nonce and
    masking key) or accepted (id); `os.urandom` also lets go of the GIL
    around its call, and with the SQLite writer thread busy, getting it back
    means waiting for that thread.
    """

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.pool):
            self.pool, self.at = os.urandom(max(4096, n)), 0
        self.at += n
        return self.pool[self.at - n : self.at]


random_bytes = _RandomPool().take
