"""Durability evidence at the system-call level: the workload in
tests/durability_workload.py run under strace, its trace read back, and two
questions asked of it (SPEC section 13, "Durability").

1. Did any `accept` return before the WAL frames holding its row were
   fsynced? (`acks_before_sync`)
2. If the power had been cut at some moment, what would the files on disk
   hold, and does SQLite recover from them every row whose accept had
   returned? (`disk_at_cut`, `recovery_problems`)

How the pieces fit:

    strace output --parse_calls--> Call (one per system call, with the trace
        lines where it started and returned)
    Calls --read_trace--> Trace: what happened to the database files, as
        Ops on inodes (Create, Unlink, Write, Truncate, Sync, DirSync) and
        the workload's markers (Ack, Phase), in trace order
    Trace --acks_before_sync--> violations of question 1
    Trace + a cut point --disk_at_cut--> file contents --recovery_problems-->
        violations of question 2

Order. strace -f writes one line per event (a call's start, a call's
return) in the order it handled the events, and a traced thread stays
stopped at each event until strace has handled it. So when one event causes
another (the writer thread returns from fdatasync, rings the event loop's
doorbell, the Trio thread wakes and writes its ACK marker), the cause's line
comes first. Positions in this module are those line numbers (from 1, as
an editor shows strace.txt); the -ttt timestamps in the file are for people
reading it. A call interrupted by another thread's event is split over two
lines ("<unfinished ...>", then "<... resumed>"): its `start` is the first
line, its `end` the second.

Power cuts (`simulate_power_cuts`) run the other way: from the trace,
rebuild the files as the disk could hold them if the power went just before
a given line, then open them with SQLite as a reboot would. The rules are
POSIX's, not one file system's: a file's writes are on the disk once an
fsync/fdatasync of it that started after they returned has returned; a
name's creation or removal once the folder was fsynced likewise; anything
else may have reached the disk in full, in part, or not at all, in any
combination and order.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import attrs

from .durability_workload import ACK, CLIENT_ID, PHASE, payload_for

ROOT = Path(__file__).resolve().parent.parent

#: Calls traced: everything that creates, changes, syncs or removes a file,
#: so that one we do not model fails loudly instead of being missed. "?"
#: lets strace skip a name this architecture lacks.
TRACED = ",".join(
    [
        "openat",
        "write",
        "pwrite64",
        "fsync",
        "fdatasync",
        "ftruncate",
        "unlinkat",
        "?unlink",
        "?writev",
        "?pwritev",
        "?pwritev2",
        "?fallocate",
        "?sync_file_range",
        "?rename",
        "?renameat",
        "?renameat2",
        "?truncate",
    ]
)

#: The files SQLite recovers from, by suffix on the database's name; the
#: -shm file is left out (SQLite rebuilds it from the WAL).
DATABASE_FILES = ("", "-wal", "-journal")

REQUIRE_ENV = "TRIO_DRAIN_REQUIRE_STRACE"


# -- running the workload under strace ---------------------------------------------------------


def strace_binary() -> str | None:
    return shutil.which("strace") or ("/usr/bin/strace" if os.path.exists("/usr/bin/strace") else None)


def strace_problem() -> str | None:
    """Why strace cannot trace here (None when it can): not installed, or
    ptrace not permitted (a container without CAP_SYS_PTRACE, Yama)."""
    strace = strace_binary()
    if strace is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:300]}"
    return None


def seccomp_flag(strace: str) -> list[str]:
    """`--seccomp-bpf` where it works: untraced calls (Trio's epoll_wait,
    the reads) then cost nothing."""
    probe = subprocess.run(
        [strace, "-f", "--seccomp-bpf", "-e", "trace=write", "-o", os.devnull, "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return ["--seccomp-bpf"] if probe.returncode == 0 and not probe.stderr.strip() else []


@attrs.frozen
class Plan:
    """How many accepts of each kind the workload makes (its arguments)."""

    singles: int = 20
    rounds: int = 2
    callers: int = 64
    batches: int = 4
    batch_size: int = 8
    mixed: int = 32

    def arguments(self) -> list[str]:
        return [
            "--singles",
            str(self.singles),
            "--rounds",
            str(self.rounds),
            "--callers",
            str(self.callers),
            "--batches",
            str(self.batches),
            "--batch-size",
            str(self.batch_size),
            "--mixed",
            str(self.mixed),
        ]

    @property
    def accepts(self) -> int:
        return self.singles + self.rounds * self.callers + self.batches * self.batch_size + self.mixed


def trace_workload(folder: Path, durability: str, plan: Plan) -> Trace:
    """Run the workload on a new outbox in `folder` under strace; its Trace."""
    strace = strace_binary()
    assert strace is not None
    db = folder / "outbox.db"
    log = folder / "strace.txt"
    command = [
        strace,
        "-f",
        *seccomp_flag(strace),
        "-ttt",
        "-y",  # descriptors with their paths: fd 11</tmp/.../outbox.db-wal>
        "-xx",  # every string byte as \xHH: data is exact, and no quote or comma inside a string
        "-s",
        str(1 << 20),  # whole writes (a WAL frame is 4 KiB)
        "-e",
        f"trace={TRACED}",
        "-o",
        str(log),
        sys.executable,
        "-m",
        "tests.durability_workload",
        str(db),
        "--durability",
        durability,
        *plan.arguments(),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the traced workload failed:\n{done.stderr[-3000:]}"
    with log.open() as lines:
        return read_trace(parse_calls(lines), db)


# -- reading strace's output ------------------------------------------------------------------


@attrs.frozen
class Call:
    """One system call: its name, its arguments and result as strace printed
    them, and the trace lines where it started and returned."""

    name: str
    args: tuple[str, ...]
    result: str
    start: int
    end: int


_LINE = re.compile(r"(?P<pid>\d+) +\d+\.\d+ (?P<body>.*)")  # PID, -ttt time (for people), body
_RESUMED = re.compile(r"<\.\.\. (?P<name>\w+) resumed>(?P<rest>.*)")
_UNFINISHED = " <unfinished ...>"
_COMPLETE = re.compile(r"(?P<name>\w+)\((?P<args>.*)\) += (?P<result>.*)")


def parse_calls(lines: Iterable[str]) -> list[Call]:
    """The calls in strace -f output, in order of their start.

    A line is `PID TIME BODY`, and BODY is one of

        name(args) = result               a whole call
        name(args <unfinished ...>        a call's start; another thread's event came next
        <... name resumed>rest) = result  the same call's return, on the same PID
        +++ exited with 0 +++ / --- SIGCHLD ... ---   not calls

    A started call waits, per PID, for its "resumed" line; the two halves
    put together read as a whole call.
    """
    calls: list[Call] = []
    started: dict[str, tuple[str, int]] = {}  # pid -> (text so far, start line)
    for number, line in enumerate(lines, start=1):
        matched = _LINE.fullmatch(line.rstrip("\n"))
        if matched is None:
            continue  # strace's own notes, e.g. "strace: Process 12 attached"
        pid, body = matched["pid"], matched["body"]
        start = number
        if body.endswith(_UNFINISHED):
            assert pid not in started, f"line {number}: a second unfinished call on pid {pid}"
            started[pid] = (body.removesuffix(_UNFINISHED), number)
            continue
        resumed = _RESUMED.fullmatch(body)
        if resumed is not None:
            head, start = started.pop(pid)
            assert head.startswith(resumed["name"] + "("), f"line {number}: resumes {head[:40]!r}"
            body = head + resumed["rest"]
        whole = _COMPLETE.fullmatch(body)
        if whole is None:
            continue  # +++ exited +++, --- signal ---, a call cut short by the process exiting
        calls.append(Call(whole["name"], split_args(whole["args"]), whole["result"], start, number))
    calls.sort(key=lambda c: c.start)
    return calls


def split_args(args: str) -> tuple[str, ...]:
    # Under -xx strings and paths are all \xHH, so ", " only ever separates arguments.
    return tuple(args.split(", ")) if args else ()


_HEX = r"(?:\\x[0-9a-f]{2})*"
_STRING = re.compile(rf'"(?P<hex>{_HEX})"(?P<cut>\.\.\.)?')
_DESCRIPTOR = re.compile(r"(?P<fd>-?\d+|AT_FDCWD)<(?P<path>[^<>]*)>(?:\(deleted\))?")


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def string_arg(arg: str) -> bytes:
    """A string argument's bytes; an error if strace cut it short (-s)."""
    matched = _STRING.fullmatch(arg)
    assert matched is not None, f"not a -xx string: {arg[:60]!r}"
    assert not matched["cut"], "strace cut a string short: raise -s"
    return unhex(matched["hex"])


def descriptor(arg: str) -> tuple[int, str]:
    """A descriptor printed under -y, e.g. `11<\\x2f...>`: (number, path).
    AT_FDCWD is -100, as in the kernel. A file unlinked since it was opened
    reads `11<\\x2f...>(deleted)`: its path is returned without the mark.
    (An older strace may print the path as plain text: taken as it is.)"""
    matched = _DESCRIPTOR.fullmatch(arg)
    assert matched is not None, f"not a -y descriptor: {arg[:60]!r}"
    fd = -100 if matched["fd"] == "AT_FDCWD" else int(matched["fd"])
    path = matched["path"]
    if re.fullmatch(_HEX, path):
        path = unhex(path).decode("utf-8", "surrogateescape")
    return fd, path.removesuffix(" (deleted)")


# -- what the calls did to the database files ---------------------------------------------------


@attrs.frozen
class Op:
    """Something that happened, at the trace lines `start` to `end`."""

    start: int
    end: int


@attrs.frozen
class Create(Op):
    """A name came into being, for a new, empty inode (open with O_CREAT)."""

    name: str  # "", "-wal" or "-journal": a suffix on the database's path
    inode: int


@attrs.frozen
class Unlink(Op):
    name: str


@attrs.frozen
class Write(Op):
    inode: int
    offset: int
    data: bytes


@attrs.frozen
class Truncate(Op):
    inode: int
    size: int


@attrs.frozen
class Sync(Op):
    """fsync or fdatasync of a file: its writes that returned before this
    started are on the disk once it returns."""

    inode: int


@attrs.frozen
class DirSync(Op):
    """fsync of the folder: its names created or removed before this
    started are on the disk once it returns."""


@attrs.frozen
class Ack(Op):
    """The workload's marker: `accept` returned for this row."""

    client_message_id: str


@attrs.frozen
class Phase(Op):
    name: str


@attrs.define
class Trace:
    """What a traced run did to the database files, in trace order, with
    the views the checks need."""

    db: Path
    ops: list[Op]
    names: dict[int, str]  # inode -> the name it was created under
    lines: int  # one past the last line: cut points run from 1 (nothing happened) to this
    acks: list[Ack] = attrs.field(init=False)
    phases: list[Phase] = attrs.field(init=False)
    name_ops: list[Create | Unlink] = attrs.field(init=False)
    dir_syncs: list[DirSync] = attrs.field(init=False)
    data_ops: dict[int, list[Write | Truncate]] = attrs.field(init=False)  # by inode
    syncs: dict[int, list[Sync]] = attrs.field(init=False)  # by inode
    # inode -> (n, its contents after its first n data ops): see durable_contents
    _prefix: dict[int, tuple[int, bytes]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        ops = self.ops
        self.acks = [op for op in ops if isinstance(op, Ack)]
        self.phases = [op for op in ops if isinstance(op, Phase)]
        self.name_ops = [op for op in ops if isinstance(op, Create | Unlink)]
        self.dir_syncs = [op for op in ops if isinstance(op, DirSync)]
        self.data_ops = {
            inode: [op for op in ops if isinstance(op, Write | Truncate) and op.inode == inode]
            for inode in self.names
        }
        self.syncs = {
            inode: [op for op in ops if isinstance(op, Sync) and op.inode == inode] for inode in self.names
        }

    def inodes(self, name: str) -> list[int]:
        """The inodes created under `name` ("", "-wal", "-journal"), in order."""
        return [inode for inode, named in self.names.items() if named == name]

    def phase_at(self, position: int) -> str:
        """The workload's phase at a trace line ("" while opening)."""
        return next((p.name for p in reversed(self.phases) if p.start < position), "")

    def durable_contents(self, inode: int, durable: list[Write | Truncate]) -> bytearray:
        """The inode's contents after `durable`, usually its first data ops:
        then built on the last such prefix asked for (power cuts are tried
        in trace order, so each adds a few operations to the last)."""
        ops = self.data_ops[inode]
        if ops[: len(durable)] != durable:  # writes from two threads overlapped a sync: rare
            content = bytearray()
            for op in durable:
                apply(content, op)
            return content
        done, before = self._prefix.get(inode, (0, b""))
        if done > len(durable):
            done, before = 0, b""
        content = bytearray(before)
        for op in ops[done : len(durable)]:
            apply(content, op)
        self._prefix[inode] = (len(durable), bytes(content))
        return content


class Unmodelled(AssertionError):
    """The trace holds a call on a database file this module does not model."""


def read_trace(calls: Sequence[Call], db: Path) -> Trace:
    """The Ops of `calls` on the database at `db` (which must not have
    existed when the trace began) and its folder.

    Descriptors are followed from the `openat` that returned them; -y's path
    on each later call is checked against that. Opening a name that does
    not exist creates a new inode: each inode's writes are kept apart, so
    a WAL unlinked and created again is two files.
    """
    db = Path(os.path.realpath(db))
    folder = str(db.parent)
    by_path = {str(db) + suffix: suffix for suffix in DATABASE_FILES}
    live: dict[str, int] = {}  # name -> inode, as the running program saw it
    names: dict[int, str] = {}
    open_files: dict[int, int | Literal["folder"]] = {}  # descriptor -> inode
    ops: list[Op] = []
    last = 0

    def target(call: Call) -> int | Literal["folder"] | None:
        """The database inode (or the folder) the call's descriptor is open
        on; None for any other file."""
        fd, path = descriptor(call.args[0])
        if path == folder:
            return "folder"
        if path not in by_path:
            open_files.pop(fd, None)  # closed, and the number reused by a socket, an eventfd...
            return None
        inode = open_files.get(fd)
        if inode == "folder" or inode is None or names[inode] != by_path[path]:
            raise Unmodelled(f"line {call.start}: {call.name} on {path}, opened where the trace cannot see")
        return inode

    for call in calls:
        last = max(last, call.end)
        span = {"start": call.start, "end": call.end}
        failed = call.result.startswith("-1 ")
        if call.name == "openat":
            if failed:
                continue
            fd, path = descriptor(call.result)
            if path in by_path:
                name = by_path[path]
                if name not in live:
                    live[name] = len(names)
                    names[live[name]] = name
                    ops.append(Create(**span, name=name, inode=live[name]))
                open_files[fd] = live[name]
            elif path == folder:
                open_files[fd] = "folder"
            else:
                open_files.pop(fd, None)
        elif call.name in ("unlink", "unlinkat"):
            path = string_arg(call.args[0 if call.name == "unlink" else 1]).decode("utf-8", "surrogateescape")
            if path in by_path and not failed:
                ops.append(Unlink(**span, name=by_path[path]))
                live.pop(by_path[path], None)
        elif call.name == "write":
            fd, path = descriptor(call.args[0])
            data = string_arg(call.args[1])
            if path == os.devnull and data.startswith(ACK):
                ops.append(Ack(**span, client_message_id=data.removeprefix(ACK).decode().strip()))
            elif path == os.devnull and data.startswith(PHASE):
                ops.append(Phase(**span, name=data.removeprefix(PHASE).decode().strip()))
            elif target(call) is not None:
                raise Unmodelled(f"line {call.start}: write() (not pwrite64) to a database file")
        elif call.name == "pwrite64":
            inode = target(call)
            if isinstance(inode, int):
                data = string_arg(call.args[1])
                assert call.result == str(len(data)), (
                    f"line {call.start}: a short or failed write: {call.result}"
                )
                ops.append(Write(**span, inode=inode, offset=int(call.args[3]), data=data))
        elif call.name in ("fsync", "fdatasync"):
            inode = target(call)
            if inode is not None:
                assert call.result == "0", f"line {call.start}: {call.name} failed: {call.result}"
                ops.append(DirSync(**span) if inode == "folder" else Sync(**span, inode=inode))
        elif call.name == "ftruncate":
            inode = target(call)
            if isinstance(inode, int):
                ops.append(Truncate(**span, inode=inode, size=int(call.args[1])))
        elif call.args and _DESCRIPTOR.fullmatch(call.args[0]) and target(call) is not None:
            raise Unmodelled(f"line {call.start}: {call.name} on a database file")
        elif call.name in ("rename", "renameat", "renameat2", "truncate") and any(
            str(db) in string_arg(arg).decode("utf-8", "replace") for arg in call.args if arg.startswith('"')
        ):
            raise Unmodelled(f"line {call.start}: {call.name} of a database file")
    assert not ops or (isinstance(ops[0], Create) and ops[0].name == ""), (
        "the trace must begin with no database"
    )
    return Trace(db=db, ops=ops, names=names, lines=last + 1)


# -- question 1: did any accept return before its row was fsynced? -------------------------------


@attrs.frozen
class Frame:
    """A WAL frame as SQLite writes it: a 24-byte header, then the page."""

    inode: int
    header: Write
    page: Write

    @property
    def commit(self) -> bool:
        """A commit frame: the header's "database size after commit" is set."""
        return self.header.data[4:8] != b"\0\0\0\0"


def wal_frames(trace: Trace) -> list[Frame]:
    """Every WAL frame written, in order. Any WAL write that is neither the
    32-byte WAL header nor part of a frame fails loudly (SQLite never writes
    one while it assumes powersafe overwrite, its default on Linux)."""
    frames = []
    page_size: dict[int, int] = {}
    header: dict[int, Write] = {}  # inode -> the frame header waiting for its page
    for op in trace.ops:
        if not isinstance(op, Write) or trace.names[op.inode] != "-wal":
            continue
        if op.offset == 0:
            assert len(op.data) == 32, f"line {op.start}: a WAL header of {len(op.data)} bytes"
            page_size[op.inode] = int.from_bytes(op.data[8:12], "big")
            continue
        size = page_size[op.inode]
        within = (op.offset - 32) % (24 + size)  # frames follow the 32-byte header
        if within == 0 and len(op.data) == 24:
            header[op.inode] = op
            continue
        frame_header = header.pop(op.inode, None)
        if (
            within != 24
            or len(op.data) != size
            or frame_header is None
            or frame_header.offset != op.offset - 24
        ):
            raise Unmodelled(f"line {op.start}: a WAL write of {len(op.data)} bytes at {op.offset}")
        frames.append(Frame(op.inode, frame_header, op))
    return frames


def acks_before_sync(trace: Trace) -> list[str]:
    """Every accept that returned before its row was durable, explained.

    A row is durable once (1) a WAL frame holding it was written, (2) so was
    its transaction's commit frame (the first commit frame from there on),
    and (3) an fsync or fdatasync of the WAL started after that commit frame
    was written and returned. Its ACK marker must come after (3) returned.
    The frame holding the row is the first WAL page whose bytes contain its
    client_message_id (later ones belong to later transactions).
    """
    frames = wal_frames(trace)
    first_frame: dict[str, int] = {}  # client_message_id -> index in frames
    for i, frame in enumerate(frames):
        for found in CLIENT_ID.findall(frame.page.data):
            first_frame.setdefault(found.decode(), i)
    problems = []
    for ack in trace.acks:
        cid = ack.client_message_id
        where = f"{cid} ({trace.phase_at(ack.start)}): accept returned at line {ack.start}"
        holding = first_frame.get(cid)
        if holding is None or frames[holding].page.end > ack.start:
            problems.append(f"{where}, before any WAL frame holding the row was written")
            continue
        commit = next((f for f in itertools.islice(frames, holding, None) if f.commit), None)
        if commit is None or commit.inode != frames[holding].inode or commit.page.end > ack.start:
            problems.append(f"{where}, before its transaction's commit frame was written")
            continue
        synced = next((s for s in trace.syncs[commit.inode] if s.start > commit.page.end), None)
        if synced is None or synced.end > ack.start:
            after = "never" if synced is None else f"only at line {synced.end}"
            problems.append(f"{where}; its commit frame (line {commit.page.end}) was synced {after}")
    return problems


# -- question 2: a power cut -------------------------------------------------------------------

#: What happens to an operation the disk had not been told to keep (no sync
#: covered it yet) when the power goes: "keep" (it reached the disk),
#: "drop" (it did not), "tear" (part of it did).
Fate = Literal["keep", "drop", "tear"]
Chooser = Callable[[Op], Fate]


OpT = TypeVar("OpT", bound=Op)


def pending_and_durable(ops: Sequence[OpT], syncs: Sequence[Op], cut: int) -> tuple[list[OpT], list[OpT]]:
    """Split the `ops` that started before `cut` into those a sync covers
    (they returned before the start of the last of `syncs` to return before
    the cut) and those still pending, each in trace order."""
    covered_before = max((s.start for s in syncs if s.end < cut), default=-1)
    durable = [op for op in ops if op.end < covered_before]
    pending = [op for op in ops if op.start < cut and not op.end < covered_before]
    return durable, pending


def disk_at_cut(
    trace: Trace, cut: int, choose: Chooser, tear: Callable[[Write], list[Write]]
) -> dict[str, bytes]:
    """The database files as a power cut just before trace line `cut` could
    leave them, by name ("", "-wal", "-journal"; a missing name is a file
    that does not exist).

    Names and contents are on the disk once synced: a name's creation or
    removal once the folder was fsynced after it, an inode's writes and
    truncations once the inode was. What was not synced yet may or may not
    have reached the disk, in part or in full, in any combination: `choose`
    says which, per operation, and `tear` what is left of a torn write.
    Operations that started after the cut never happened.
    """
    durable_names, pending_names = pending_and_durable(trace.name_ops, trace.dir_syncs, cut)
    files: dict[str, int] = {}
    for name_op in durable_names + [
        op for op in pending_names if choose(op) != "drop"
    ]:  # (no half-made name)
        if isinstance(name_op, Create):
            files[name_op.name] = name_op.inode
        else:
            files.pop(name_op.name, None)
    contents = {}
    for name, inode in files.items():
        durable, pending = pending_and_durable(trace.data_ops[inode], trace.syncs[inode], cut)
        content = trace.durable_contents(inode, durable)
        for op in pending:
            fate = choose(op)
            if fate == "keep" or (fate == "tear" and isinstance(op, Truncate)):  # no half truncation
                apply(content, op)
            elif fate == "tear" and isinstance(op, Write):
                for piece in tear(op):
                    apply(content, piece)
        contents[name] = bytes(content)
    return contents


def apply(content: bytearray, op: Write | Truncate) -> None:
    if isinstance(op, Write):
        if len(content) < op.offset:
            content.extend(bytes(op.offset - len(content)))
        content[op.offset : op.offset + len(op.data)] = op.data
    elif isinstance(op, Truncate):
        if len(content) > op.size:
            del content[op.size :]
        else:
            content.extend(bytes(op.size - len(content)))


def recovery_problems(folder: Path, files: dict[str, bytes], acked: Sequence[str]) -> list[str]:
    """Write `files` into the empty `folder`, let SQLite open the database
    as it would after a reboot (rolling back a hot journal, replaying the
    WAL), and say what is wrong: an integrity failure, a row whose accept
    had returned that is missing, or any row whose payload is not the one
    the workload wrote."""
    db = folder / "outbox.db"
    for name, content in files.items():
        Path(str(db) + name).write_bytes(content)
    if "" not in files:
        return [f"the database file is gone, with {len(acked)} accepted rows"] if acked else []
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")  # the checkpoint at close need not fsync a scratch copy
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = (
            dict(conn.execute("SELECT client_message_id, payload FROM outbox")) if "outbox" in tables else {}
        )
    except sqlite3.DatabaseError as exc:
        return [f"SQLite cannot read the recovered database: {exc}"]
    finally:
        conn.close()
    problems = []
    if integrity != ["ok"]:
        problems.append(f"integrity_check: {'; '.join(integrity[:3])}")
    missing = [cid for cid in acked if cid not in rows]
    if missing:
        problems.append(f"{len(missing)} of {len(acked)} accepted rows lost, e.g. {missing[:3]}")
    damaged = [cid for cid, payload in rows.items() if payload != payload_for(cid)]
    if damaged:
        problems.append(f"{len(damaged)} rows with a wrong payload, e.g. {damaged[:3]}")
    return problems


def acked_before(trace: Trace, cut: int) -> list[str]:
    """Rows whose accept had returned before the cut (their marker started)."""
    return [ack.client_message_id for ack in trace.acks if ack.start < cut]


def sample_cuts(trace: Trace, count: int, rng: random.Random) -> list[int]:
    """About `count` cut points, drawn evenly from around four kinds of
    moment (writes to the main database file, which only checkpoints make;
    WAL writes; syncs and name changes; returned accepts), plus the moment
    after each phase's last accept and the end of the trace.

    A cut around an operation is just before it started, while it was
    under way, or just after it returned."""

    def around(ops: Iterable[Op]) -> list[int]:
        return sorted({p for op in ops for p in (op.start, op.start + 1, op.end + 1)})

    def kind(op: Op) -> str:
        if isinstance(op, Write):
            return "wal" if trace.names[op.inode] == "-wal" else "database"
        return "ack" if isinstance(op, Ack) else "sync or name"

    groups: dict[str, list[Op]] = {}
    for op in trace.ops:
        if not isinstance(op, Phase):
            groups.setdefault(kind(op), []).append(op)
    points = {trace.lines}
    for ops in groups.values():
        candidates = around(ops)
        points.update(rng.sample(candidates, min(len(candidates), count // len(groups))))
    last_ack: dict[str, Ack] = {}
    for ack in trace.acks:
        last_ack[trace.phase_at(ack.start)] = ack
    points.update(ack.start + 1 for ack in last_ack.values())
    return sorted(points)


@attrs.define
class PowerCuts:
    """What `simulate_power_cuts` found."""

    cuts: int = 0
    recoveries: int = 0
    acked: int = 0  # accepted rows looked for, summed over recoveries
    unsynced: int = 0  # cuts where unsynced operations made a difference to the files
    problems: list[str] = attrs.Factory(list)


def keep_none(op: Op) -> Fate:
    return "drop"


def keep_all(op: Op) -> Fate:
    return "keep"


def random_fate(rng: random.Random, op: Op) -> Fate:
    fate: Fate = rng.choice(["keep", "keep", "drop", "tear"])
    return fate


def tear(rng: random.Random, write: Write) -> list[Write]:
    """What may be left of `write` after a torn write: a prefix of it (any
    length), its range as zeros (as a delayed allocation can leave it), or
    some of its 512-byte sectors and not others; the rest of its range as
    it was before."""
    how = rng.choice(["prefix", "zeros", "sectors"])
    if how == "prefix":
        return [attrs.evolve(write, data=write.data[: rng.randrange(len(write.data))])]
    if how == "zeros":
        return [attrs.evolve(write, data=bytes(len(write.data)))]
    return [
        attrs.evolve(write, offset=write.offset + at, data=write.data[at : at + 512])
        for at in range(0, len(write.data), 512)
        if rng.random() < 0.5
    ]


def simulate_power_cuts(trace: Trace, folder: Path, *, cuts: int, torn_per_cut: int, seed: int) -> PowerCuts:
    """Cut the power at about `cuts` points of the trace. At each, rebuild
    the files as only the synced operations left them, as every started
    operation left them, and `torn_per_cut` random mixes of the two (each
    unsynced operation kept, dropped, or torn), and let SQLite recover
    each. Returns every problem found."""
    found = PowerCuts()
    for cut in sample_cuts(trace, cuts, random.Random(seed)):
        found.cuts += 1
        acked = acked_before(trace, cut)
        rng = random.Random(f"{seed}/{cut}")
        variants: list[tuple[str, Chooser]] = [("synced only", keep_none), ("every started write", keep_all)]
        variants += [(f"torn #{k}", functools.partial(random_fate, rng)) for k in range(torn_per_cut)]
        rebuilt = [
            (name, disk_at_cut(trace, cut, choose, functools.partial(tear, rng))) for name, choose in variants
        ]
        found.unsynced += rebuilt[0][1] != rebuilt[1][1]
        for name, files in rebuilt:
            here = folder / f"cut-{cut}"
            here.mkdir()
            try:
                problems = recovery_problems(here, files, acked)
            finally:
                shutil.rmtree(here)
            found.recoveries += 1
            found.acked += len(acked)
            where = f"power cut at line {cut} ({trace.phase_at(cut) or 'opening'}), {name}"
            found.problems.extend(f"{where}: {p}" for p in problems)
    return found
