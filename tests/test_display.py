"""Untrusted text in front of an operator (SPEC section 8): escape sequences,
C1 controls, bidi overrides and rich markup from a request, the outbox or a
broker are shown inert and visible; --json stays exact; repeated warnings
are kept quiet."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_drain import MeshIdentity, WebSocketBroker, generate_secret_key
from trio_drain._brokers._wire import classify_ack
from trio_drain._cli._logging import TextFormatter
from trio_drain._display import Throttle, visible

from .procs import run

HOSTILE = "\x1b[2J\x1b[31mred\x1b]0;owned\x07 \x9b31m \u202eevil\u202c [bold red]X[/]"
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\u202c")


def assert_inert(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"{ch!r} reached the terminal"


def unsafe(c: str) -> bool:
    code = ord(c)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or c in "\u061c\u200e\u200f\u2028\u2029"
        or 0x202A <= code <= 0x202E
        or 0x2066 <= code <= 0x2069
    )


@given(st.text())
def test_visible_text_holds_no_control_bidi_or_separator_character_and_leaves_the_rest(text: str) -> None:
    shown = visible(text)
    assert not any(unsafe(c) for c in shown)
    if not any(unsafe(c) for c in text):
        assert shown == text


def hostile_row(db: Path) -> None:
    assert (
        run("send", "--db", str(db), "--mesh", "alpha", "--to", "*", "--client-id", "h-1", HOSTILE).returncode
        == 0
    )
    conn = sqlite3.connect(db)
    with conn:  # as other software (or an old version) could have written it
        conn.execute(
            "UPDATE outbox SET target_spec = ?, last_error = ?, client_message_id = ?",
            (HOSTILE, HOSTILE, "[b]X[/b]\x1b[2J"),
        )
    conn.close()


def test_outbox_inspect_and_list_show_hostile_text_inert_and_json_stays_exact(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    hostile_row(db)
    listed = run("outbox", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert_inert(listed.stdout)
    assert "[b]X[/b]" in listed.stdout, "markup is shown, not interpreted"
    row_id = json.loads(run("outbox", "list", "--db", str(db), "--json").stdout)[0]["id"]
    shown = run("outbox", "inspect", "--db", str(db), row_id)
    assert shown.returncode == 0, shown.stderr
    assert_inert(shown.stdout)
    assert "\\x1b[2J" in shown.stdout and "\\u202e" in shown.stdout
    exact = json.loads(run("outbox", "inspect", "--db", str(db), "--json", row_id).stdout)
    assert exact["payload"] == HOSTILE and exact["target_spec"] == HOSTILE


def test_inspect_abbreviates_a_payload_over_a_kibibyte_unless_full(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    assert (
        run(
            "send", "--db", str(db), "--mesh", "alpha", "--to", "*", "--client-id", "big", "é" * 3000
        ).returncode
        == 0
    )
    short = run("outbox", "inspect", "--db", str(db), "big").stdout
    line = next(line for line in short.splitlines() if line.strip().startswith("payload:"))
    assert "6,000 bytes in all; --full shows them" in line and line.count("é") == 512
    full = run("outbox", "inspect", "--db", str(db), "--full", "big").stdout
    line = next(line for line in full.splitlines() if line.strip().startswith("payload:"))
    assert line.count("é") == 3000 and "--full" not in line


def test_a_brokers_error_text_is_stored_and_logged_inert_and_bounded() -> None:
    result = classify_ack({"type": "ack", "id": "c", "queued": False, "error": HOSTILE + "x" * 5000})
    assert result.error is not None and len(result.error) <= 1000
    assert_inert(result.error)
    assert result.error.startswith("\\x1b[2J\\x1b[31mred")


def test_log_lines_are_made_inert() -> None:
    record = logging.LogRecord(
        "trio_drain.worker", logging.WARNING, __file__, 1, "row %s is dead: %s", ("r-1", HOSTILE), None
    )
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert_inert(line)
    assert line.startswith("WARNING row r-1 is dead: \\x1b[2J")


def test_throttle_lets_the_first_few_through_then_one_a_period_with_a_count() -> None:
    now = [0.0]
    throttle = Throttle(burst=3, every=60.0, clock=lambda: now[0])
    assert [throttle("k") for _ in range(3)] == [0, 0, 0]
    assert [throttle("k") for _ in range(100)] == [None] * 100
    assert throttle("other") == 0, "each kind has its own count"
    now[0] = 61.0
    assert throttle("k") == 100
    assert throttle("k") is None


def test_a_broker_sending_garbage_on_every_frame_gets_a_few_warnings_not_one_per_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = WebSocketBroker(
        "ws://127.0.0.1:1/ws", MeshIdentity(mesh_id="m", member_id="u", secret_key=generate_secret_key())
    )
    with caplog.at_level(logging.INFO, logger="trio_drain.broker"):
        for _ in range(1000):
            broker._on_frame("this is not json")
            broker._on_frame(json.dumps({"type": "ack", "id": "nobody-waits"}))
            broker._on_frame(json.dumps({"type": "error", "code": "x", "message": HOSTILE}))
    assert len(caplog.records) == 9, [r.getMessage() for r in caplog.records]
    for r in caplog.records:
        assert_inert(r.getMessage())
