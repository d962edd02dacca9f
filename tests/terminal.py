"""A program under a pseudo-terminal, its screen read as a person would see
it: what it writes goes through a terminal emulator (pyte), and a test reads
the emulated screen, types keys, and checks the terminal's settings after."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Sequence

import pyte


class Terminal:
    """`argv` running with a pseudo-terminal as its controlling terminal and
    its stdin, stdout and stderr, `columns` x `lines` big.

    A thread feeds what the program writes to a pyte screen; `raw` keeps
    the bytes too, for the escape sequences a screen does not show.
    """

    def __init__(
        self, argv: Sequence[str], *, columns: int = 100, lines: int = 40, env: dict[str, str] | None = None
    ) -> None:
        self.screen = pyte.Screen(columns, lines)
        self._stream = pyte.ByteStream(self.screen)
        self._lock = threading.Lock()
        self.raw = bytearray()
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.settings_before = termios.tcgetattr(self.slave)
        environment = {**os.environ, "TERM": "xterm-256color", **(env or {})}
        for name in ("COLUMNS", "LINES", "NO_COLOR", "TERM_PROGRAM"):
            environment.pop(name, None)

        def controlling_terminal() -> None:  # in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            list(argv),
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=controlling_terminal,  # the child is the pty's session leader
            env=environment,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                if self.proc.poll() is not None and not self._pending():
                    return
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.raw += data
                self._stream.feed(data)

    def _pending(self) -> bool:
        ready, _, _ = select.select([self.master], [], [], 0)
        return bool(ready)

    def text(self) -> str:
        """The screen as it stands, a line per row, trailing spaces cut."""
        with self._lock:
            return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, condition: Callable[[str], bool] | str, timeout: float = 20.0) -> str:
        """Wait until the screen holds `condition` (a text, or a test of the
        screen's text); return the screen then.

        Raises:
            AssertionError: not within `timeout` seconds, with the screen.
        """
        check = (lambda t: condition in t) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        while True:
            shown = self.text()
            if check(shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"not on the screen within {timeout}s:\n{shown}")
            if self.proc.poll() is not None and not self._pending():
                raise AssertionError(f"exited with {self.proc.returncode} first:\n{shown}")
            time.sleep(0.05)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 15.0) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(5)
        return status

    def settings(self) -> list[object]:
        """The terminal's settings now (echo, line buffering...)."""
        return termios.tcgetattr(self.slave)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def number_after(label: str, text: str) -> int | None:
    """The number in the column headed `label` of a rich table's first data
    row: the header's line, a rule, then the row, whose right-aligned
    numbers end where their header ends. None if there is no such number."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        at = line.find(label)
        if at < 0 or i + 2 >= len(lines):
            continue
        cells = lines[i + 2][: at + len(label)].split()
        if cells and re.fullmatch(r"[\d,]+", cells[-1]):
            return int(cells[-1].replace(",", ""))
        return None
    return None
