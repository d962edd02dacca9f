"""The command line, through real subprocesses."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_drain._brokers._identity import generate_secret_key
from trio_drain._cli._main import build_parser

from .procs import CLI, assert_clean_error, counts, run, start_broker, start_run, wait_for_done, write_config


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("trio-drain ")


def test_send_then_inspect_with_json(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    sent = run(
        "send", "--db", db, "--mesh", "alpha", "--to", "#general", "--client-id", "c-1", "--json", "hello"
    )
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["kind"] == "accepted_pending"
    assert json.loads(run("outbox", "stats", "--db", db, "--json").stdout) == {
        "pending": 1,
        "inflight": 0,
        "done": 0,
        "dead": 0,
        "aborted": 0,
    }
    (row,) = json.loads(run("outbox", "list", "--db", db, "--json").stdout)
    assert (row["client_message_id"], row["payload"], row["status"]) == ("c-1", "hello", "pending")
    inspected = json.loads(run("outbox", "inspect", "--db", db, "c-1", "--json").stdout)
    assert inspected["id"] == row["id"]
    requeued = json.loads(run("outbox", "requeue", "--db", db, "c-1", "--json").stdout)
    assert requeued["status"] == "pending" and requeued["client_message_id"] != "c-1"
    dropped = json.loads(run("outbox", "drop", "--db", db, requeued["id"], "--json").stdout)
    assert dropped["status"] == "aborted"
    assert json.loads(run("outbox", "prune", "--db", db, "--json").stdout) == {"deleted": 0}
    conflict = run("send", "--db", db, "--mesh", "alpha", "--to", "#general", "--client-id", "c-1", "other")
    assert conflict.returncode == 1 and "conflict" in conflict.stdout


def test_outbox_commands_refuse_a_missing_database(tmp_path: Path) -> None:
    assert_clean_error(run("outbox", "stats", "--db", str(tmp_path / "none.db")), 2, "no outbox database")
    assert not (tmp_path / "none.db").exists()


def test_a_corrupt_database_is_a_runtime_error_and_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    db.write_bytes(b"garbage" * 1000)
    assert_clean_error(run("outbox", "list", "--db", str(db)), 1, "not a usable SQLite database")
    assert db.read_bytes() == b"garbage" * 1000


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    result = run(
        "send", "--db", str(tmp_path / "o.db"), "--mesh", "a", "--to", "*", "--priority", "urgent", "x"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_clean_error(
        run("send", "--db", str(tmp_path / "o.db"), "--mesh", "a", "--to", "", "x"), 1, "target_spec"
    )
    unknown = run("outbox", "inspect", "--db", str(tmp_path / "o.db"), "nope")
    assert_clean_error(unknown, 1, "no outbox row")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[drain\n", "not valid TOML"),
        ("[drain]\nmax_inflight = 0\n[[mesh]]\n", "max_inflight"),
        ("[drain]\nbogus = 1\n", "[drain]: unknown key(s) bogus"),
        ("", "at least one [[mesh]]"),
        (
            '[[mesh]]\nslug = "a"\nmesh_id = "m"\nmember_id = "u"\nbroker_url = "http://x"\nsecret_key = "ab"\n',
            "ws://",
        ),
        (
            '[[mesh]]\nslug = "a"\nmesh_id = "m"\nmember_id = "u"\nbroker_url = "ws://x"\nsecret_key = "ab"\n',
            "128 hex",
        ),
        (
            '[[mesh]]\nslug = "a"\nmesh_id = "m"\nmember_id = "u"\nbroker_url = "ws://x"\nsecret_key_file = "nope"\n',
            "secret_key_file",
        ),
        (
            '[[mesh]]\nslug = "a"\nmesh_id = 42\nmember_id = "u"\nbroker_url = "ws://x"\nsecret_key = "ab"\n',
            "[[mesh]] #1 (a): mesh_id must be a string, got an integer (42)",
        ),
    ],
    ids=[
        "malformed",
        "bad value",
        "unknown key",
        "no mesh",
        "bad url",
        "bad key",
        "missing key file",
        "wrong type",
    ],
)
def test_bad_configs_are_one_line_and_exit_2(tmp_path: Path, content: str, fragment: str) -> None:
    db = tmp_path / "o.db"
    run("send", "--db", str(db), "--mesh", "alpha", "--to", "*", "x")
    config = tmp_path / "c.toml"
    config.write_text(content)
    result = run("run", "--db", str(db), "--config", str(config))
    assert_clean_error(result, 2, fragment)
    assert result.stderr.startswith(f"trio-drain: error: config {config}: ")  # one style for every mistake
    assert secret_not_in(result)


def secret_not_in(result: subprocess.CompletedProcess[str]) -> bool:
    return "ab" * 64 not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    run("send", "--db", str(tmp_path / "o.db"), "--mesh", "alpha", "--to", "*", "x")
    assert_clean_error(
        run("run", "--db", str(tmp_path / "o.db"), "--config", str(tmp_path / "no.toml")),
        2,
        "cannot read config",
    )


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "key"
    result = run("keygen", "--out", str(out))
    assert result.returncode == 0 and len(result.stdout.strip()) == 64
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600 and len(out.read_text().strip()) == 128
    assert_clean_error(run("keygen", "--out", str(out)), 2, "refusing to overwrite")
    pair = json.loads(run("keygen").stdout)
    assert len(pair["secret_key"]) == 128 and pair["secret_key"].endswith(pair["public_key"])


def test_demo_drains_every_message_and_exits_0(tmp_path: Path) -> None:
    result = run("demo", "--messages", "300", "--db", str(tmp_path / "demo.db"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "delivered" in result.stdout and "300" in result.stdout
    conn = sqlite3.connect(tmp_path / "demo.db")
    assert conn.execute("SELECT count(*) FROM outbox WHERE status = 'done'").fetchone()[0] == 300


def test_sigterm_during_a_drain_loses_nothing(tmp_path: Path) -> None:
    broker, url = start_broker(tmp_path, "--ack-delay", "0.005")
    db = tmp_path / "o.db"
    try:
        for i in range(3):
            run("send", "--db", str(db), "--mesh", "alpha", "--to", "#t", f"seed {i}")
        import trio

        from trio_drain import SendRequest, open_outbox

        async def fill() -> None:
            async with open_outbox(db) as ob:
                await ob.accept_many(
                    [SendRequest(mesh="alpha", target_spec="#t", payload=b"m%d" % i) for i in range(3000)]
                )

        trio.run(fill)
        config = write_config(tmp_path / "c.toml", url, generate_secret_key())
        worker = start_run(db, config)
        wait_for_done(db, 300, seconds=30)
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        assert "Traceback" not in err
        after = counts(db)
        assert after["inflight"] == 0
        assert after["done"] + after["pending"] == 3003
        assert after["done"] < 3003, "stopped before the end, so the test means something"
        # A second run finishes the job: nothing was lost.
        worker = start_run(db, config)
        wait_for_done(db, 3003, seconds=60)
        worker.send_signal(signal.SIGINT)
        worker.communicate(timeout=30)
        assert counts(db)["done"] == 3003
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.communicate(timeout=30)
    accepted = sqlite3.connect(tmp_path / "broker.db").execute("SELECT count(*) FROM accepted").fetchone()[0]
    assert accepted == 3003


def test_broker_serve_needs_members_or_open() -> None:
    result = run("broker", "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_broker_serve_rejects_a_malformed_members_file(tmp_path: Path) -> None:
    members = tmp_path / "m.json"
    members.write_text('{"mesh": {"u": "not-hex"}}')
    assert_clean_error(run("broker", "serve", "--members", str(members), "--port", "0"), 2, "members file")


@pytest.mark.parametrize("limit", ["10", "ten/60", "0/60", "10/0", "10/-1", "10/inf"])
def test_broker_serve_refuses_a_malformed_rate_limit_in_one_line(limit: str) -> None:
    assert_clean_error(
        run("broker", "serve", "--open", "--port", "0", "--rate-limit", limit), 2, "rate limit"
    )


def test_json_logs_are_one_object_per_line_and_hold_no_secret(tmp_path: Path) -> None:
    broker, url = start_broker(tmp_path)
    secret = generate_secret_key()
    db = tmp_path / "o.db"
    try:
        run("send", "--db", str(db), "--mesh", "alpha", "--to", "*", "x")
        config = write_config(tmp_path / "c.toml", url, secret)
        worker = start_run(db, config, "--log-format", "json", "--log-level", "debug")
        wait_for_done(db, 1, seconds=20)
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "debug logging should have said something"
    entries = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert secret not in err and secret[:64] not in err


def test_unknown_keys_in_a_mesh_table_are_a_config_error(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    run("send", "--db", str(db), "--mesh", "alpha", "--to", "*", "x")
    config = write_config(tmp_path / "c.toml", "ws://127.0.0.1:1/ws", generate_secret_key())
    config.write_text(config.read_text() + 'brokr_url = "typo"\n')
    assert_clean_error(run("run", "--db", str(db), "--config", str(config)), 2, "unknown key(s) brokr_url")


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    run("send", "--db", str(db), "--mesh", "alpha", "--to", "*", "--client-id", "only", "x")
    lister = subprocess.Popen(
        [*CLI, "outbox", "list", "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert lister.stdout is not None
    lister.stdout.close()  # as `| head` does, before the command writes
    _, err = lister.communicate(timeout=60)
    assert b"Traceback" not in err and lister.returncode == 1, err


def every_option(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("trio-drain",)
) -> Iterator[tuple[str, argparse.Action]]:
    """Every option and argument of the command line, with the command it belongs to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_option(sub, (*path, name))
        elif action.dest != "help":
            yield " ".join(path), action


def test_every_option_has_help_text_and_db_says_it_takes_a_postgresql_url() -> None:
    options = list(every_option(build_parser()))
    silent = [f"{command} {'/'.join(a.option_strings) or a.dest}" for command, a in options if not a.help]
    assert silent == []
    dbs = [a.help for _, a in options if "--db" in a.option_strings]
    assert len(dbs) >= 10
    for command, action in options:
        # The demo's and the broker's --db are files of their own, not an outbox to name.
        if "--db" in action.option_strings and command not in ("trio-drain demo", "trio-drain broker serve"):
            assert action.help is not None and "postgresql://" in action.help, command


def test_a_usage_mistake_is_one_line_naming_the_command() -> None:
    result = run("outbox", "list", "--db", "o.db", "--limit", "0")
    assert_clean_error(result, 2, "outbox list: argument --limit: must be between 1 and 10000")
    assert "see trio-drain outbox list --help" in result.stderr
    assert_clean_error(run("nonsense"), 2, "invalid choice")
