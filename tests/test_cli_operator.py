"""The operator's commands (`outbox ...`, `send`) as an operator uses them,
on SQLite and PostgreSQL: pause and resume a route, requeue and drop by
filter with a dry run first, prune by status and age, name rows by a prefix
of their id without ever acting on a row not meant, read rows with their
times, lanes and paused state; send a message too big for the command line.

Most run the command line in this process (`operator_rows.cli`); those about
what reaches the terminal (one line on stderr, exit status, a pipe) run it
as a real process."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import trio

from trio_drain import OutboxRow, open_outbox
from trio_drain import _lifecycle as lc
from trio_drain._clock import wall_clock_ms

from .builders import req
from .operator_rows import POLICY, cli, make_mixed_outbox
from .procs import CLI, assert_clean_error, run

ISO_AGE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ, (\d+ (s|min|h|days) ago|just now)")


def rows_of(target: str) -> dict[str, dict[str, object]]:
    """Every row, by client id, as `outbox list --json` prints it."""
    listed = cli("outbox", "list", "--db", target, "--json", "--limit", "1000")
    assert listed.status == 0, listed.err
    return {r["client_message_id"]: r for r in json.loads(listed.out)}


def counts(target: str) -> dict[str, int]:
    return dict(json.loads(cli("outbox", "stats", "--db", target, "--json").out))


def claimed_meshes(target: str) -> list[str]:
    """The meshes of the rows a worker's claim would take now (then given back)."""

    async def claim() -> list[str]:
        async with open_outbox(target) as ob:
            rows = await ob.claim(limit=100, lease_ms=60_000, max_age_ms=10**12, token="probe")
            now = wall_clock_ms()
            await ob.complete([lc.on_released(r, sent=False, now=now, policy=POLICY) for r in rows])
            return sorted({r.mesh or "" for r in rows})

    return trio.run(claim)


# -- steer: pause and resume


def test_a_paused_route_is_kept_in_the_database_shown_in_stats_and_not_claimed(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target)
    paused = cli("outbox", "pause", "--db", outbox_target, "--mesh", "alpha", "--by", "alice")
    assert paused.status == 0 and "paused mesh:alpha" in paused.out, paused.err
    assert "paused route mesh:alpha (by alice)" in paused.err  # the log line
    again = cli("outbox", "pause", "--db", outbox_target, "--mesh", "alpha")
    assert again.status == 0 and "paused already" in again.out and "alice" in again.out

    stats = json.loads(cli("outbox", "stats", "--db", outbox_target, "--json").out)
    assert stats["paused"]["mesh:alpha"]["paused_by"] == "alice"
    assert stats["pending"] == 4
    text = cli("outbox", "stats", "--db", outbox_target).out
    assert "mesh:alpha" in text and "alice" in text and ISO_AGE.search(text)
    listed = cli("outbox", "list", "--db", outbox_target, "--mesh", "alpha", "--status", "pending").out
    assert listed.count("pending, paused") == 3  # a-pend, c-0 and c-1
    assert claimed_meshes(outbox_target) == ["beta"]  # only that route stops

    resumed = cli("outbox", "resume", "--db", outbox_target, "--mesh", "alpha", "--json")
    assert json.loads(resumed.out) == {"route": "mesh:alpha", "paused": False, "changed": True}
    assert set(counts(outbox_target)) == {"pending", "inflight", "done", "dead", "aborted"}
    assert "was not paused" in cli("outbox", "resume", "--db", outbox_target, "--mesh", "alpha").out
    assert claimed_meshes(outbox_target) == ["alpha", "beta"]


def test_a_session_route_pauses_by_its_public_key(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target)
    key = "ab" * 32
    assert cli("outbox", "pause", "--db", outbox_target, "--session", key, "--json").status == 0
    assert list(json.loads(cli("outbox", "stats", "--db", outbox_target, "--json").out)["paused"]) == [
        f"session:{key}"
    ]
    assert claimed_meshes(outbox_target) == ["alpha", "beta"]  # no row of theirs goes by that session


def test_pause_names_exactly_one_route(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    make_mixed_outbox(db)
    assert cli("outbox", "pause", "--db", db).status == 2
    both = cli("outbox", "pause", "--db", db, "--mesh", "a", "--session", "b")
    assert both.status == 2 and "not allowed with" in both.err and len(both.err.splitlines()) == 1


# -- steer: bulk requeue and drop


def test_requeue_by_filter_shows_a_dry_run_then_changes_each_row_and_records_who(outbox_target: str) -> None:
    ids = make_mixed_outbox(outbox_target)
    before = counts(outbox_target)
    dry = cli(
        "outbox", "requeue", "--db", outbox_target, "--status", "dead", "--error", "forbidden", "--dry-run"
    )
    assert dry.status == 0, dry.err
    assert "would requeue 2 row(s)" in dry.out and "a-dead-1" in dry.out and "b-dead" in dry.out
    assert "a-dead-2" not in dry.out
    assert counts(outbox_target) == before  # a dry run changes nothing
    dry_json = cli(
        "outbox",
        "requeue",
        "--db",
        outbox_target,
        "--status",
        "dead",
        "--error",
        "forbidden",
        "--dry-run",
        "--json",
    )
    plan = json.loads(dry_json.out)
    assert (plan["dry_run"], plan["count"]) == (True, 2)
    assert sorted(r["id"] for r in plan["rows"]) == sorted([ids["a-dead-1"], ids["b-dead"]])

    done = cli(
        "outbox",
        "requeue",
        "--db",
        outbox_target,
        "--status",
        "dead",
        "--error",
        "forbidden",
        "--by",
        "carol",
        "--json",
    )
    assert json.loads(done.out) == {"requeued": 2, "by": "carol"}
    assert "requeued 2 row(s)" in done.err and "carol" in done.err  # the log line
    rows = rows_of(outbox_target)
    for cid in ("a-dead-1", "b-dead"):
        assert (rows[cid]["status"], rows[cid]["aborted_by"]) == ("aborted", "carol")
        successor = next(r for r in rows.values() if r["id"] == rows[cid]["superseded_by"])
        assert successor["status"] == "pending" and successor["payload"] == cid
    assert rows["a-dead-2"]["status"] == "dead"


def test_drop_by_mesh_takes_pending_and_dead_rows_and_names_the_operator(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target)
    dropped = cli("outbox", "drop", "--db", outbox_target, "--mesh", "beta")
    assert dropped.status == 0 and "dropped 2 row(s)" in dropped.out, dropped.err
    rows = rows_of(outbox_target)
    assert {rows[c]["status"] for c in ("b-dead", "b-pend")} == {"aborted"}
    assert rows["b-pend"]["aborted_by"]  # the OS user, or "operator"
    assert rows["a-pend"]["status"] == "pending"


def test_bulk_filters_take_an_age(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target, minutes_ago=60)  # rows 60 to 54 minutes old
    dry = cli("outbox", "drop", "--db", outbox_target, "--older-than", "58.5m", "--dry-run", "--json")
    assert sorted(r["client_message_id"] for r in json.loads(dry.out)["rows"]) == ["a-dead-1", "a-dead-2"]
    assert (
        json.loads(
            cli("outbox", "drop", "--db", outbox_target, "--older-than", "2h", "--dry-run", "--json").out
        )["count"]
        == 0
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "name rows, or give a filter"),
        (("--status", "done"), "cannot requeue done rows"),
        (("--older-than", "7w"), "not an age"),
        (("--older-than=-1d",), "not an age"),
        (("--status", "stuck"), "not a status"),
        (("--error", ""), "--error needs a value that is not empty"),
        (("--mesh", ""), "--mesh needs a value"),
        (("m-1", "--status", "dead"), "rows or a filter, not both"),
    ],
    ids=["nothing", "done", "unit", "negative", "status", "empty error", "empty mesh", "both"],
)
def test_requeue_refuses_what_it_cannot_do_and_changes_nothing(
    tmp_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    db = str(tmp_path / "o.db")
    make_mixed_outbox(db)
    before = counts(db)
    result = cli("outbox", "requeue", "--db", db, *args)
    assert result.status == 2, result
    assert len(result.err.splitlines()) == 1 and fragment in result.err
    assert counts(db) == before


def test_drop_of_rows_by_name_checks_them_all_before_changing_any(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    ids = make_mixed_outbox(db)
    result = cli("outbox", "drop", "--db", db, "a-pend", ids["a-dead-1"])
    assert result.status == 0, result.err
    assert cli("outbox", "requeue", "--db", db, "b-pend", "a-pend").status == 1  # a-pend is aborted now
    assert rows_of(db)["b-pend"]["status"] == "pending"  # so b-pend was left alone


# -- prune


def test_prune_deletes_dead_and_aborted_rows_only_onreq(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target)
    cli("outbox", "drop", "--db", outbox_target, "--mesh", "beta", "--status", "pending")
    assert json.loads(cli("outbox", "prune", "--db", outbox_target, "--older-than", "0s", "--json").out) == {
        "deleted": 0
    }
    pruned = cli(
        "outbox", "prune", "--db", outbox_target, "--older-than", "10m", "--status", "dead", "aborted"
    )
    assert pruned.status == 0 and "deleted 3 row(s)" in pruned.out, (
        pruned.err
    )  # dead an hour ago; aborted now: kept
    assert counts(outbox_target)["dead"] == 0 and counts(outbox_target)["aborted"] == 1
    assert (
        "deleted 1 row(s)"
        in cli("outbox", "prune", "--db", outbox_target, "--older-than", "0s", "--status", "aborted").out
    )
    refused = cli("outbox", "prune", "--db", outbox_target, "--status", "pending")
    assert refused.status == 2 and "not pending" in refused.err


# -- naming rows


def test_a_client_id_equal_to_another_rows_id_never_hides_that_row(outbox_target: str) -> None:
    async def make() -> tuple[str, str]:
        async with open_outbox(outbox_target) as ob:
            first = await ob.accept(req("first"))
            assert first.row_id is not None
            second = await ob.accept(req(first.row_id))  # its client id is the first row's id
            assert second.row_id is not None
            return first.row_id, second.row_id

    first, second = trio.run(make)
    for action in ("inspect", "requeue", "drop"):
        refused = cli("outbox", action, "--db", outbox_target, first)
        assert refused.status == 2, refused
        assert first in refused.err and second in refused.err and "--client-id" in refused.err
    assert counts(outbox_target)["pending"] == 2  # nothing was changed
    by_id = json.loads(cli("outbox", "inspect", "--db", outbox_target, "--id", first, "--json").out)
    by_client_id = json.loads(
        cli("outbox", "inspect", "--db", outbox_target, "--client-id", first, "--json").out
    )
    assert (by_id["id"], by_client_id["id"]) == (first, second)
    dropped = json.loads(cli("outbox", "drop", "--db", outbox_target, "--client-id", first, "--json").out)
    assert dropped["id"] == second and dropped["status"] == "aborted"
    assert json.loads(cli("outbox", "inspect", "--db", outbox_target, "--id", first, "--json").out)[
        "status"
    ] == ("pending")


def test_list_shows_ids_as_prefixes_that_inspect_requeue_and_drop_accept(outbox_target: str) -> None:
    ids = make_mixed_outbox(outbox_target)
    listed = cli("outbox", "list", "--db", outbox_target, "--status", "dead").out
    for cid in ("a-dead-1", "a-dead-2", "b-dead"):
        line = next(line for line in listed.splitlines() if cid in line)
        prefix = line.split()[1]
        assert ids[cid].startswith(prefix) and len(prefix) >= 8
        inspected = cli("outbox", "inspect", "--db", outbox_target, prefix, "--json")
        assert json.loads(inspected.out)["id"] == ids[cid], inspected.err
    prefix = next(line for line in listed.splitlines() if "a-dead-2" in line).split()[1]
    assert cli("outbox", "requeue", "--db", outbox_target, prefix).status == 0
    assert rows_of(outbox_target)["a-dead-2"]["status"] == "aborted"
    shared = ids["a-dead-1"][:4]  # every row's id starts so
    ambiguous = cli("outbox", "inspect", "--db", outbox_target, shared)
    assert ambiguous.status == 2 and "give more of the id" in ambiguous.err
    unknown = cli("outbox", "inspect", "--db", outbox_target, "zz")
    assert unknown.status == 1 and "no outbox row" in unknown.err


# -- see: list and inspect


def test_list_filters_pages_and_shows_times_with_their_age(outbox_target: str) -> None:
    make_mixed_outbox(outbox_target)
    listed = cli("outbox", "list", "--db", outbox_target, "--limit", "3", "--oldest-first")
    assert listed.status == 0, listed.err
    assert [c for c in ("a-dead-1", "a-dead-2", "b-dead", "a-pend") if c in listed.out] == [
        "a-dead-1",
        "a-dead-2",
        "b-dead",
    ]
    assert ISO_AGE.search(listed.out) and "min ago" in listed.out
    hint = listed.lines[-1]
    assert hint.startswith("(the next 3: --after ")
    cursor = hint.split()[-1].rstrip(")")
    page2 = cli(
        "outbox", "list", "--db", outbox_target, "--limit", "3", "--oldest-first", "--after", cursor
    ).out
    assert "a-pend" in page2 and "b-pend" in page2 and "a-dead-1" not in page2
    newest = cli("outbox", "list", "--db", outbox_target, "--limit", "2").out
    assert newest.splitlines()[-1].startswith("(the next 2: --before ")

    def cids(*args: str) -> list[str]:
        out = cli("outbox", "list", "--db", outbox_target, "--json", *args).out
        return [r["client_message_id"] for r in json.loads(out)]

    assert cids("--mesh", "beta") == ["b-pend", "b-dead"]
    assert cids("--lane", "conv") == ["c-1", "c-0"]
    assert cids("--error", "too large") == ["a-dead-2"]
    assert cids("--older-than", "57.5m", "--oldest-first") == ["a-dead-1", "a-dead-2", "b-dead"]
    assert cids("--status", "dead", "pending", "--mesh", "beta") == ["b-pend", "b-dead"]


def test_inspect_shows_times_dashes_hex_the_lane_and_the_paused_route(outbox_target: str) -> None:
    async def make() -> None:
        async with open_outbox(outbox_target) as ob:
            await ob.accept(req("bin", payload=b"\xff\x00\x01binary", ordering_key="conv-7"))

    trio.run(make)
    cli("outbox", "pause", "--db", outbox_target, "--mesh", "alpha", "--by", "dora")
    shown = cli("outbox", "inspect", "--db", outbox_target, "bin")
    assert shown.status == 0, shown.err
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(": ") for line in shown.lines)}
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z, (\d+ s ago|just now)", fields["enqueued_at"]
    )
    assert fields["delivered_at"] == "-" and fields["last_error"] == "-" and fields["aborted_by"] == "-"
    assert fields["payload"] == "9 bytes, binary (hex): ff0001" + b"binary".hex()
    assert fields["ordering_key (lane)"] == "conv-7"
    assert fields["route"].startswith("mesh:alpha (paused since ") and "by dora" in fields["route"]
    assert "None" not in shown.out


def test_inspect_abbreviates_a_long_payload_unless_full(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")

    async def make() -> None:
        async with open_outbox(db) as ob:
            await ob.accept(req("long", payload=b"x" * 5000))

    trio.run(make)
    short = cli("outbox", "inspect", "--db", db, "long").out
    assert "5,000 bytes: " + "x" * 1024 + " … (5,000 bytes in all; --full shows them)" in short
    assert "x" * 5000 in cli("outbox", "inspect", "--db", db, "long", "--full").out


# -- send


def test_send_reads_a_megabyte_from_a_file_or_stdin_and_takes_an_ordering_key(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    big = bytes(range(256)) * 4096  # 1 MiB, not text
    message = tmp_path / "m.bin"
    message.write_bytes(big)
    common = ["send", "--db", db, "--mesh", "alpha", "--to", "*", "--max-message-bytes", "2000000", "--json"]
    from_file = cli(*common, "--client-id", "f", "--ordering-key", "conv", "--file", str(message))
    assert json.loads(from_file.out)["kind"] == "accepted_pending", from_file.err
    # Through a real pipe, as a shell does it.
    piped = subprocess.run(
        [*CLI, *common, "--client-id", "s", "-"], input=big, capture_output=True, timeout=60
    )
    assert piped.returncode == 0, piped.stderr
    rows = _rows(db)
    assert rows["f"].payload == big and rows["s"].payload == big
    assert rows["f"].ordering_key == "conv" and rows["s"].ordering_key is None
    assert cli("outbox", "inspect", "--db", db, "f").out.count("1,048,576 bytes, binary (hex)") == 1


def test_send_refuses_a_message_the_broker_could_never_take_and_a_missing_file(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    message = tmp_path / "m.txt"
    message.write_bytes(b"y" * 100_000)
    too_big = cli("send", "--db", db, "--mesh", "alpha", "--to", "*", "--file", str(message))
    assert too_big.status == 1 and len(too_big.err.splitlines()) == 1
    missing = cli("send", "--db", db, "--mesh", "alpha", "--to", "*", "--file", str(tmp_path / "none"))
    assert missing.status == 2 and "cannot read the message" in missing.err
    assert cli("send", "--db", db, "--mesh", "alpha", "--to", "*").status == 2
    both = cli("send", "--db", db, "--mesh", "alpha", "--to", "*", "--file", str(message), "text")
    assert both.status == 2


# -- what reaches the terminal, through a real process


def test_operator_mistakes_are_one_line_with_status_2_from_a_real_process(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    make_mixed_outbox(db)
    assert_clean_error(run("outbox", "requeue", "--db", db), 2, "name rows, or give a filter")
    assert_clean_error(run("outbox", "prune", "--db", db, "--older-than", "soon"), 2, "not an age")
    assert_clean_error(run("outbox", "list", "--db", db, "--bogus"), 2, "unrecognized arguments")
    assert_clean_error(run("outbox", "pause", "--db", db), 2, "--mesh")


def _rows(db: str) -> dict[str, OutboxRow]:
    async def read() -> dict[str, OutboxRow]:
        async with open_outbox(db) as ob:
            return {r.client_message_id: r for r in await ob.list(limit=100)}

    return trio.run(read)


def test_a_hostile_route_or_operator_name_is_shown_inert(tmp_path: Path) -> None:
    db = str(tmp_path / "o.db")
    make_mixed_outbox(db)
    hostile = "\x1b[2J\u202eevil[bold]x"
    paused = cli("outbox", "pause", "--db", db, "--mesh", hostile, "--by", hostile)
    assert paused.status == 0, paused.err
    for output in (paused.out, paused.err, cli("outbox", "stats", "--db", db).out):
        assert "\x1b" not in output and "\u202e" not in output
        assert "\\x1b[2J\\u202eevil[bold]x" in output
    exact = json.loads(cli("outbox", "stats", "--db", db, "--json").out)
    assert exact["paused"][f"mesh:{hostile}"]["paused_by"] == hostile
