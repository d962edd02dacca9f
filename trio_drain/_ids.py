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
    global _last
    with _lock:
        ms = wall_clock_ms()
        # 74 random-but-monotonic bits below the timestamp.
        candidate = (ms << 74) | int.from_bytes(os.urandom(10), "big") >> 6
        if candidate <= _last:
            candidate = _last + 1
        _last = candidate
    ms, rand = candidate >> 74, candidate & ((1 << 74) - 1)
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    h = f"{value:032x}"  # formatted by hand: uuid.UUID() is most of the cost
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_token() -> str:
    """An unguessable lease token."""
    return os.urandom(12).hex()
