"""``trio-drain top`` as a person sees it: run under a pseudo-terminal, its
screen read through a terminal emulator (pyte), keys typed into it."""

from __future__ import annotations

import contextlib
import io
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import trio

from trio_drain import _lifecycle as lc
from trio_drain import generate_secret_key, open_outbox
from trio_drain._cli._top import Endpoint, parse_endpoint, render
from trio_drain._metrics._sampler import Sample
from trio_drain._store._overview import DeadRow, Overview, RouteRows

from .builders import BIG, req
from .procs import CLI, Broker, fill, write_config
from .terminal import Terminal, number_after

#: An error text that would retitle the window, clear the screen, turn on
#: rich markup and reverse the line, were it written as it is.
EVIL = "\x1b]0;pwned\x07\x1b[2J[bold red]markup[/bold red] \u202eright-to-left \x9b31m"


def top(db: str | Path, *options: str, columns: int = 110, lines: int = 40) -> Terminal:
    return Terminal([*CLI, "top", "--db", str(db), *options], columns=columns, lines=lines)


async def add_dead_row(target: str | Path, cid: str, error: str) -> None:
    async with open_outbox(target) as ob:
        await ob.accept(req(cid, mesh="dead-end"))
        (row,) = await ob.claim(limit=1, lease_ms=60_000, max_age_ms=BIG, token="t")
        await ob.complete(
            [
                lc.on_error(
                    row, error=error, permanent=True, now=ob.clock(), policy=lc.RetryPolicy(), jitter=0.0
                )
            ]
        )


def assert_quits_cleanly(term: Terminal, keys: bytes) -> None:
    """`keys` end it with status 0, the terminal as it was before."""
    term.type(keys)
    assert term.wait() == 0, term.text()
    assert term.settings() == term.settings_before, "the terminal's settings were not restored"
    assert bytes(term.raw).endswith(b"\x1b[?1049l"), "the main screen was not restored"


def test_top_shows_the_numbers_move_while_rows_drain_and_q_quits(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    fill(db, 600)
    broker = Broker(tmp_path, "--ack-delay", "0.02").start()
    config = write_config(tmp_path / "c.toml", broker.url, generate_secret_key(), drain={"max_inflight": 2})
    run = None
    try:
        with top(db, "--interval", "0.3", "--metrics", "127.0.0.1:1") as term:
            shown = term.wait_for(lambda t: number_after("pending", t) == 600)
            assert number_after("done", shown) == 0
            assert "mesh:alpha" in shown and "newest dead rows" in shown
            # --metrics names an endpoint nobody serves: said once, the view goes on.
            assert "metrics endpoint:" in shown

            run = subprocess.Popen(
                [*CLI, "run", "--db", str(db), "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            done_seen: set[int] = set()
            rates: set[int] = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                screen = term.text()
                done = number_after("done", screen)
                if done is not None:
                    done_seen.add(done)
                rate = number_after("delivered/s", screen)
                if rate is not None:
                    rates.add(rate)
                if done == 600:
                    break
                time.sleep(0.1)
            between = sorted(d for d in done_seen if 0 < d < 600)
            assert len(between) >= 2, f"the done count did not move on screen: {sorted(done_seen)}"
            assert max(rates) > 0, "no delivery rate shown while rows drained"
            final = term.wait_for(lambda t: number_after("backlog", t) == 0)
            assert number_after("pending", final) == 0
            assert_quits_cleanly(term, b"q")
    finally:
        if run is not None:
            run.terminate()
            run.wait(30)
        broker.stop()


def test_ctrl_c_quits_top_with_status_0(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    fill(db, 3)
    with top(db) as term:
        term.wait_for(lambda t: number_after("pending", t) == 3)
        assert_quits_cleanly(term, b"\x03")  # the terminal turns it into SIGINT


def test_what_the_outbox_says_is_shown_inert(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    trio.run(add_dead_row, db, "cid", EVIL)
    # accept refuses control characters in ids; a row an older writer left may hold them.
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE outbox SET client_message_id = 'cid-' || char(27) || '[31mred'")
    with top(db) as term:
        shown = term.wait_for("newest dead rows")
        shown = term.wait_for("markup")
        assert "\\x1b]0;pwned\\x07" in shown  # the escape, written out
        assert "red]markup[/bold red]" in shown  # markup, not style (the line wraps)
        assert "\\u202e" in shown and "\\x9b" in shown
        assert "cid-\\x1b[31mred" in shown
        assert term.screen.title != "pwned"
        raw = bytes(term.raw)
        assert b"\x1b]0;pwned" not in raw and b"\x1b[2J" not in raw and "\u202e".encode() not in raw
        assert_quits_cleanly(term, b"q")


def test_top_on_postgresql(pg_url: str) -> None:
    async def setup() -> None:
        async with open_outbox(pg_url) as ob:
            await ob.accept_many([req(f"m{i}") for i in range(7)])
            await ob.pause(mesh="alpha")
        await add_dead_row(pg_url, "gone", "refused: no such topic")

    trio.run(setup)
    with top(pg_url, "--interval", "0.5") as term:
        shown = term.wait_for(lambda t: number_after("pending", t) == 7)
        assert number_after("dead", shown) == 1
        assert "paused" in shown.split("routes", 1)[1]
        assert "refused: no such topic" in shown
        assert "postgresql://" in shown
        assert_quits_cleanly(term, b"q")


def test_top_without_a_terminal_prints_a_frame_a_refresh(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    fill(db, 2)
    proc = subprocess.Popen(
        [*CLI, "top", "--db", str(db), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("trio-drain top") >= 3
    assert "\x1b[" not in out  # no escapes when not a terminal


def test_top_refuses_a_missing_outbox(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "top", "--db", str(tmp_path / "nope.db")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no outbox database" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("interval", ["0", "-1", "soon"])
def test_top_refuses_a_bad_interval(tmp_path: Path, interval: str) -> None:
    result = subprocess.run(
        [*CLI, "top", "--db", str(tmp_path / "o.db"), "--interval", interval],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--interval" in result.stderr


# -- the view itself, without a terminal


def test_routes_show_up_and_down_from_a_metrics_endpoint() -> None:
    page = (
        "# TYPE trio_drain_route_up gauge\n"
        'trio_drain_route_up{route="mesh:alpha"} 1.0\n'
        'trio_drain_route_up{route="session:abababababab"} 0.0\n'
        "# TYPE trio_drain_window gauge\ntrio_drain_window 64.0\n"
        "# TYPE trio_drain_in_flight gauge\ntrio_drain_in_flight 3.0\n"
    )
    endpoint = parse_endpoint(page)
    assert endpoint == Endpoint({"mesh:alpha": True, "session:abababababab": False}, 3, 64)
    overview = Overview(
        counts={"pending": 5, "inflight": 1, "done": 9, "dead": 0, "aborted": 0},
        routes=(RouteRows(route="mesh:alpha", pending=4), RouteRows(route="session:" + "ab" * 32, pending=1)),
    )
    text = rendered(Sample(overview=overview, read_at=0.0, counts_at=0.0, routes_at=0.0), endpoint)
    alpha = next(line for line in text.splitlines() if line.startswith("mesh:alpha"))
    session = next(line for line in text.splitlines() if line.startswith("session:"))
    assert alpha.rstrip().endswith("up") and session.rstrip().endswith("down")
    assert "in flight 3 of a window of 64" in text


def test_a_page_that_is_not_metrics_is_said_so() -> None:
    assert parse_endpoint("<html>hello</html>\n{{{").error is not None


def rendered(sample: Sample, endpoint: Endpoint | None = None) -> str:
    from rich.console import Console

    console = Console(width=120, record=True, force_terminal=False, file=io.StringIO())
    console.print(render(sample, where="test", interval=1.0, endpoint=endpoint, now=0.0))
    return console.export_text()


def test_dead_rows_in_the_view_keep_their_errors_inert() -> None:
    dead = DeadRow(
        id="r1", client_message_id="c1", route="mesh:x", last_error=EVIL, enqueued_at=0, attempts=3
    )
    text = rendered(Sample(overview=Overview(newest_dead=(dead,)), read_at=0.0))
    assert "\x1b" not in text and "\u202e" not in text
    assert "[bold red]markup[/bold red]" in text


def test_a_large_outbox_says_how_old_its_counts_are() -> None:
    overview = Overview(counts={"pending": 1, "inflight": 0, "done": 0, "dead": 0, "aborted": 0})
    text = rendered(Sample(overview=overview, read_at=0.0, counts_at=-12.0))
    assert "counted 12 s ago" in text
