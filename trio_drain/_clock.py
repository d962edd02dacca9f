"""Wall-clock time as the outbox and the wire protocol count it."""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    """Milliseconds since the epoch (row times, hello timestamps)."""
    return time.time_ns() // 1_000_000
