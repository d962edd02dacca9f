"""The durability claim, checked from outside at the system-call level (SPEC
section 13): at durability="full", no `accept` returns before the WAL
holding its row is fsynced, and a power cut at any point loses no row whose
accept returned.

A workload (tests/durability_workload.py: one caller, 64 concurrent
callers, accept_many, accepts alongside a drainer's claims) runs under
strace; tests/durability.py reads the trace and asks both questions of it.
Each check is also run where it must fail, on an outbox opened with
durability="normal" (no fsync per commit), so that a check that cannot
fail would show.

strace must be installed and allowed to trace (ptrace); without it these
tests skip, unless TRIO_DRAIN_REQUIRE_STRACE is set (CI), when they fail.
The long version is `nox -s durability` (TRIO_DRAIN_DURABILITY_CUTS power
cuts on a larger workload); TRIO_DRAIN_DURABILITY_SEED picks other cuts.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import attrs
import pytest

from .durability import (
    REQUIRE_ENV,
    Ack,
    Create,
    DirSync,
    Plan,
    Sync,
    Trace,
    Write,
    acks_before_sync,
    disk_at_cut,
    keep_all,
    keep_none,
    parse_calls,
    read_trace,
    simulate_power_cuts,
    strace_problem,
    trace_workload,
)

LONG_CUTS = os.environ.get("TRIO_DRAIN_DURABILITY_CUTS")
SEED = int(os.environ.get("TRIO_DRAIN_DURABILITY_SEED", "1418"))
if LONG_CUTS:
    # About 1,800 accepts: several checkpoints, the WAL started over each time.
    PLAN = Plan(singles=600, rounds=8, callers=64, batches=20, batch_size=16, mixed=400)
    CUTS = int(LONG_CUTS)
else:
    # 150 single accepts take the WAL past SQLite's 1,000-page automatic
    # checkpoint once, so the short run has a checkpoint and a WAL restart too.
    PLAN = Plan(singles=150, rounds=2, callers=64, batches=4, batch_size=8, mixed=64)
    CUTS = 100
TORN_PER_CUT = 2
#: Enough for the checks to have something to catch at durability="normal".
NORMAL_PLAN = Plan(singles=20, rounds=1, callers=64, batches=2, batch_size=8, mixed=16)


# -- the reader and the model, on traces written by hand --------------------------------------


def hx(data: str | bytes) -> str:
    """`data` as strace -xx prints it."""
    raw = data.encode() if isinstance(data, str) else data
    return "".join(f"\\x{b:02x}" for b in raw)


WAL_HEADER = bytes.fromhex("377f0682002de218") + (4096).to_bytes(4, "big") + bytes(20)
COMMIT_FRAME_HEADER = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(16)  # page 1, commit: size 1
PAGE = (b"single-0000-0000 single-0000-0001 " + bytes(4096))[:4096]


def hand_written_trace(first_ack_line: int) -> list[str]:
    """The Trio thread (pid 10) and the writer thread (11): a commit frame
    holding two rows, an fdatasync of the WAL interrupted by the Trio
    thread's ACK for the first row (line 7), then the second ACK. With
    `first_ack_line` 9 the first ACK comes after the sync instead."""
    wal, null = f"4<{hx('/d/o.db-wal')}>", f"5<{hx('/dev/null')}>"
    acks = [hx(f"ACK single-0000-000{i}\n") for i in (0, 1)]
    lines = [
        f'10 1.01 openat(AT_FDCWD<{hx("/d")}>, "{hx("/d/o.db")}", O_RDWR|O_CREAT, 0644) = 3<{hx("/d/o.db")}>',
        f'11 1.02 openat(AT_FDCWD<{hx("/d")}>, "{hx("/d/o.db-wal")}", O_RDWR|O_CREAT, 0644) = {wal}',
        f'11 1.03 pwrite64({wal}, "{hx(WAL_HEADER)}", 32, 0) = 32',
        f'11 1.04 pwrite64({wal}, "{hx(COMMIT_FRAME_HEADER)}", 24, 32) = 24',
        f'11 1.05 pwrite64({wal}, "{hx(PAGE)}", 4096, 56) = 4096',
        f"11 1.06 fdatasync({wal} <unfinished ...>",
        "11 1.08 <... fdatasync resumed>) = 0",
        "11 1.09 +++ exited with 0 +++",
        f'10 1.10 write({null}, "{acks[1]}", 21) = 21',
    ]
    lines.insert(first_ack_line - 1, f'10 1.07 write({null}, "{acks[0]}", 21) = 21')
    return [line + "\n" for line in lines]


def test_the_trace_reader_joins_a_call_split_by_another_threads_event() -> None:
    calls = parse_calls(hand_written_trace(first_ack_line=7))
    sync = next(c for c in calls if c.name == "fdatasync")
    assert (sync.start, sync.end, sync.result) == (6, 8, "0")
    trace = read_trace(calls, Path("/d/o.db"))
    assert trace.names == {0: "", 1: "-wal"}
    assert [(a.client_message_id, a.start) for a in trace.acks] == [
        ("single-0000-0000", 7),
        ("single-0000-0001", 10),
    ]
    assert trace.syncs[1] == [Sync(start=6, end=8, inode=1)]
    # The first ACK came while the fdatasync was still under way: caught.
    (problem,) = acks_before_sync(trace)
    assert problem.startswith("single-0000-0000") and "synced only at line 8" in problem
    # After it returned: fine.
    assert (
        acks_before_sync(read_trace(parse_calls(hand_written_trace(first_ack_line=9)), Path("/d/o.db"))) == []
    )


def test_the_power_cut_model_keeps_what_was_synced_and_may_keep_the_rest() -> None:
    trace = Trace(
        db=Path("/d/o.db"),
        names={0: "", 1: "-wal"},
        lines=8,
        ops=[
            Create(1, 1, name="", inode=0),
            DirSync(2, 2),
            Write(3, 3, inode=0, offset=0, data=b"aaaa"),
            Sync(4, 4, inode=0),
            Write(5, 5, inode=0, offset=2, data=b"bb"),
            Create(6, 6, name="-wal", inode=1),  # the folder is never synced again
            Ack(7, 7, client_message_id="x"),
        ],
    )

    def no_tear(write: Write) -> list[Write]:
        raise AssertionError("nothing is torn here")

    def first_byte(write: Write) -> list[Write]:
        return [attrs.evolve(write, data=write.data[:1])]

    # Before the fsync returned, its write may be lost; after, it may not.
    assert disk_at_cut(trace, 4, keep_none, no_tear) == {"": b""}
    assert disk_at_cut(trace, 5, keep_none, no_tear) == {"": b"aaaa"}
    # At the end: the unsynced write and the unsynced name, lost, kept or torn.
    assert disk_at_cut(trace, 8, keep_none, no_tear) == {"": b"aaaa"}
    assert disk_at_cut(trace, 8, keep_all, no_tear) == {"": b"aabb", "-wal": b""}
    assert disk_at_cut(trace, 8, lambda op: "tear", first_byte) == {"": b"aaba", "-wal": b""}


# -- the real thing, under strace --------------------------------------------------------------


@pytest.fixture(scope="module")
def strace_ready() -> None:
    problem = strace_problem()
    if problem is not None:
        if os.environ.get(REQUIRE_ENV):  # CI: skipping would hide the check
            pytest.fail(f"{problem} ({REQUIRE_ENV} is set)")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def full_trace(strace_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Trace:
    return trace_workload(tmp_path_factory.mktemp("full"), "full", PLAN)


@pytest.fixture(scope="module")
def normal_trace(strace_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Trace:
    return trace_workload(tmp_path_factory.mktemp("normal"), "normal", NORMAL_PLAN)


def where(trace: Trace) -> str:
    return f"(trace: {trace.db.parent / 'strace.txt'})"


def shown(problems: list[str]) -> str:
    return "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")


def test_no_accept_returns_before_the_wal_holding_its_row_is_synced(full_trace: Trace) -> None:
    acked = [a.client_message_id for a in full_trace.acks]
    assert len(acked) == len(set(acked)) == PLAN.accepts, where(full_trace)
    by_phase = collections.Counter(full_trace.phase_at(a.start) for a in full_trace.acks)
    assert by_phase == {
        "single": PLAN.singles,
        "concurrent": PLAN.rounds * PLAN.callers,
        "many": PLAN.batches * PLAN.batch_size,
        "mixed": PLAN.mixed,
    }

    problems = acks_before_sync(full_trace)
    assert not problems, (
        f"accepts returned before their row was fsynced {where(full_trace)}:\n{shown(problems)}"
    )

    # The concurrent callers did share commits: this phase checked group commit.
    (wal,) = full_trace.inodes("-wal")
    concurrent_syncs = [s for s in full_trace.syncs[wal] if full_trace.phase_at(s.start) == "concurrent"]
    assert len(concurrent_syncs) < PLAN.rounds * PLAN.callers / 4, where(full_trace)


def test_the_sync_check_fails_when_accept_does_not_wait_for_an_fsync(normal_trace: Trace) -> None:
    problems = acks_before_sync(normal_trace)
    assert len(problems) == len(normal_trace.acks) == NORMAL_PLAN.accepts, where(normal_trace)


def test_a_power_cut_at_any_point_loses_no_accepted_row(full_trace: Trace, tmp_path: Path) -> None:
    # The run checkpoints while accepting (the main database written, the
    # WAL started over), not only when it closes.
    (db,) = full_trace.inodes("")
    checkpoints = {full_trace.phase_at(op.start) for op in full_trace.data_ops[db] if isinstance(op, Write)}
    assert checkpoints - {"", "close"}, where(full_trace)

    found = simulate_power_cuts(full_trace, tmp_path, cuts=CUTS, torn_per_cut=TORN_PER_CUT, seed=SEED)
    print(
        f"\n{found.cuts} power cuts (seed {SEED}), {found.recoveries} recoveries, {found.acked} accepted rows"
        f" looked for; at {found.unsynced} cuts unsynced writes made a difference"
    )
    assert not found.problems, f"seed {SEED} {where(full_trace)}:\n{shown(found.problems)}"
    assert found.acked > 0 and found.unsynced > 0


def test_the_power_cut_check_fails_when_accept_does_not_wait_for_an_fsync(
    normal_trace: Trace, tmp_path: Path
) -> None:
    found = simulate_power_cuts(normal_trace, tmp_path, cuts=12, torn_per_cut=1, seed=SEED)
    assert any("accepted rows lost" in p for p in found.problems), where(normal_trace)
