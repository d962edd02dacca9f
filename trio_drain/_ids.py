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
    """`count` new UUIDv7s, in increasing order (one random read for all)."""
    global _last
    randomness = os.urandom(10 * count)
    values = []
    with _lock:
        base = wall_clock_ms() << 74
        last = _last
        for i in range(0, 10 * count, 10):
            # 74 random-but-monotonic bits below the timestamp.
            candidate = base | int.from_bytes(randomness[i:i + 10], "big") >> 6
            if candidate <= last:
                candidate = last + 1
            last = candidate
            values.append(candidate)
        _last = last
    return [_format(v) for v in values]


_RAND_BITS = (1 << 74) - 1
_RAND_B_BITS = (1 << 62) - 1


def _format(candidate: int) -> str:
    ms, rand = candidate >> 74, candidate & _RAND_BITS
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & _RAND_B_BITS)
    h = f"{value:032x}"  # formatted by hand: uuid.UUID() is most of the cost
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_token() -> str:
    """An unguessable lease token."""
    return os.urandom(12).hex()
