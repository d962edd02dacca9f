"""Named crash points: a fault-injection hook for the reliability tests.

Off unless the environment variable ``TRIO_DRAIN_CRASH_AT`` is set when the
package is imported. Its value is ``<point>`` or ``<point>@<n>``: the n-th
time (default the first) the code passes that point, the process kills
itself with SIGKILL, exactly as a power cut or the OOM killer would, with
no cleanup, no flush and no `finally`.

Points (see `POINTS`):

- ``claim_before_commit``: the claim's UPDATE ran, its transaction has not
  committed (SQLite back end).
- ``claim_after_commit``: the claim committed; no row has been sent.
- ``send_left``: a send frame was handed to the kernel (the socket write
  returned); its ack has not arrived. Counted by the native and wsproto
  transports: each socket write carrying messages after the hello counts once.
- ``ack_before_record``: the ack arrived; the outcome is not yet recorded.
- ``completion_mid_batch``: a batch of completions is written, not yet
  committed (SQLite back end).

When off, `reached` costs one global lookup and comparison.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

POINTS = frozenset(
    {
        "claim_before_commit",
        "claim_after_commit",
        "send_left",
        "ack_before_record",
        "completion_mid_batch",
    }
)
ENV = "TRIO_DRAIN_CRASH_AT"


class _Armed:
    def __init__(self, spec: str) -> None:
        point, _, nth = spec.partition("@")
        if point not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: unknown crash point; known: {', '.join(sorted(POINTS))}")
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise ValueError(f"{ENV}={spec!r}: the count after @ must be a whole number from 1")
        self.point = point
        self.remaining = int(nth) if nth else 1
        self._lock = threading.Lock()  # points are passed in worker threads too

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self.remaining -= 1
            if self.remaining > 0:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def _arm(spec: str | None) -> _Armed | None:
    """The crash point `spec` names, or None. A value that names none is
    ignored with a warning: a stray environment variable must not stop the
    library from importing."""
    if not spec:
        return None
    try:
        return _Armed(spec)
    except ValueError as exc:
        logging.getLogger("trio_drain").warning("ignoring %s", exc)
        return None


_ARMED: _Armed | None = _arm(os.environ.get(ENV))


def armed(point: str) -> bool:
    """Whether the test armed this point (for hooks that need bookkeeping)."""
    return _ARMED is not None and _ARMED.point == point


def reached(point: str) -> None:
    """Die here if the test armed this point (see the module docstring)."""
    if _ARMED is not None:
        _ARMED.reached(point)
