"""Untrusted text made safe to show, and warnings that repeat kept quiet.

Strings that come from a request, the outbox or a broker may hold terminal
escape sequences (``ESC [2J`` clears the screen, ``ESC ]0;...BEL`` retitles
the window), C1 controls (``\\x9b`` is a one-byte CSI on many terminals),
bidi overrides that reorder what the operator reads (U+202E), or rich
markup (``[bold red]``). Human output and log lines show them through
`visible`, which turns every such character into a visible escape; rich
output passes them as `rich.text.Text`, which is never parsed as markup.
``--json`` output stays exact (JSON escapes control characters itself).
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable

#: C0 and C1 controls, DEL, the bidi embeddings, overrides, isolates and
#: marks, and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every control, bidi and separator character written as a
    visible escape (``\\x1b``, ``\\u202e``): inert in any terminal."""
    return _UNSAFE.sub(_escape, text)


def bounded(text: str, limit: int = 1000) -> str:
    """`visible(text)`, cut to `limit` characters (with a mark where cut)."""
    shown = visible(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def iso_time(ms: int, *, precise: bool = False) -> str:
    """A time in milliseconds since the epoch as ISO 8601 in UTC: to the
    minute (``2026-12-01T21:33Z``), or to the millisecond if `precise`."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    if precise:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%MZ")


def age(ms: int, now_ms: int) -> str:
    """How long before `now_ms` the time `ms` is (``4 min ago``), or after
    it (``in 30 s``), in the largest unit that keeps a whole number."""
    delta = (now_ms - ms) / 1000
    seconds = abs(delta)
    if seconds < 1:
        return "just now"
    for unit, size, least in (("days", 86400, 2 * 86400), ("h", 3600, 3600), ("min", 60, 60)):
        if seconds >= least:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"{amount} ago" if delta > 0 else f"in {amount}"


def when(ms: int | None, now_ms: int, *, precise: bool = False) -> str:
    """A time for a person: ``2026-12-01T21:33Z, 4 min ago``; a dash for None.

    Args:
        ms: Milliseconds since the epoch, or None.
        now_ms: Now, on the same clock.
        precise: To the millisecond rather than the minute.
    """
    if ms is None:
        return "-"
    return f"{iso_time(ms, precise=precise)}, {age(ms, now_ms)}"


def payload_text(payload: bytes, *, limit: int | None = None, more: str = "") -> str:
    """A payload for a person, with its length: UTF-8 text made inert, or
    hex for anything else; cut after `limit` bytes (None: whole), saying so.

    Args:
        payload: The bytes.
        limit: Show at most this many bytes.
        more: Said where the payload is cut (how to see the rest).
    """
    shown = payload if limit is None else payload[:limit]
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        text = f"{len(payload):,} bytes, binary (hex): {shown.hex()}"
    else:  # a cut may split a character: drop its first bytes
        text = f"{len(payload):,} bytes: {visible(shown.decode('utf-8', errors='ignore'))}"
    if len(shown) < len(payload):
        text += f" … ({len(payload):,} bytes in all{more})"
    return text


class Throttle:
    """Lets the first `burst` occurrences of each kind of warning through,
    then one every `every` seconds, which says how many it kept quiet.

    A broker that sends garbage on every frame would otherwise write a
    warning per message.
    """

    def __init__(
        self, *, burst: int = 3, every: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.every = every
        self._clock = clock
        self._seen: dict[object, list[float]] = {}  # kind -> [count, quiet since last, next report at]

    def __call__(self, kind: object) -> int | None:
        """None: keep this one quiet. Otherwise log it, and mention the number
        returned (occurrences kept quiet since the last one logged) if > 0."""
        now = self._clock()
        state = self._seen.get(kind)
        if state is None:
            if len(self._seen) > 1000:  # kinds are few; never grow without bound
                self._seen.clear()
            state = self._seen[kind] = [0, 0, now]
        state[0] += 1
        if state[0] <= self.burst:
            state[2] = now + self.every
            return 0
        if now < state[2]:
            state[1] += 1
            return None
        quiet = int(state[1])
        state[1] = 0
        state[2] = now + self.every
        return quiet


def quieted(n: int) -> str:
    """The suffix a throttled warning carries."""
    return f" ({n} more like this since the last report)" if n else ""
