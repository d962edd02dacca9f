"""``trio-drain demo`` as a person sees it: the accept phase has a bar of its
own (the screen is never blank while rows go in), and each bar shows its
percent, rate and elapsed time."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .procs import CLI
from .terminal import Terminal

#: A bar's line: its phase, percent, done of all, messages a second, elapsed and remaining time.
BAR = re.compile(
    r"^(accepting|draining) .*?(\d+)% +(\d+)/(\d+) +([\d,]+|-) msg/s (\d+:\d\d:\d\d) (\d+:\d\d:\d\d|-:--:--)"
)


def bars(screen: str) -> dict[str, tuple[int, int, str]]:
    """Each phase's percent, rows done and rate as the screen shows them."""
    found = {}
    for line in screen.splitlines():
        match = BAR.match(line)
        if match:
            phase, percent, done, _, rate, _, _ = match.groups()
            found[phase] = (int(percent), int(done), rate)
    return found


def test_the_demo_shows_its_accept_phase_then_its_drain(tmp_path: Path) -> None:
    messages = 30_000
    argv = [*CLI, "demo", "--messages", str(messages), "--db", str(tmp_path / "demo.db")]
    with Terminal(argv, columns=120, lines=30) as term:
        seen: list[dict[str, tuple[int, int, str]]] = []
        deadline = time.monotonic() + 180
        while term.proc.poll() is None and time.monotonic() < deadline:
            shown = bars(term.text())
            if shown:
                seen.append(shown)
            time.sleep(0.05)
        assert term.wait(60) == 0, term.text()
        final = term.text()
    accepting = [s["accepting"] for s in seen if "accepting" in s and "draining" not in s]
    assert accepting, f"the accept phase never showed:\n{final}"
    assert any(0 < done < messages for _, done, _ in accepting), f"no accept progress seen: {accepting}"
    assert any(rate != "-" for _, _, rate in accepting), "no accept rate shown"
    draining = [s["draining"] for s in seen if "draining" in s]
    assert any(0 < done < messages for _, done, _ in draining), "no drain progress seen"
    end = bars(final)
    assert end["accepting"][:2] == (100, messages) and end["draining"][:2] == (100, messages), final
    assert "delivered (done)" in final
