"""The program tests/test_durability.py runs under strace.

    python -m tests.durability_workload OUTBOX.db --durability full \
        --singles 20 --rounds 2 --callers 64 --batches 4 --batch-size 8 --mixed 32

It opens a new outbox and accepts rows in four ways, one phase after the
other: one caller accepting one row at a time (`--singles`); `--callers`
tasks accepting one row each at the same moment, `--rounds` times (so
group commit puts many callers in one transaction); `accept_many` calls of
`--batch-size` rows (`--batches`); and `--mixed` rows accepted by 8
callers while a drainer claims and completes them, so that transactions
that need no fsync (claims, completions) run between and alongside ones
that do.

Right after an accept returns, in the same task and before it awaits
anything, the program writes `ACK <client_message_id>\\n` to a file
descriptor it opened on /dev/null for that purpose alone. The write is a
system call, so strace records it in order with the database's writes and
fsyncs: the trace says what had reached the disk when each accept returned.
`PHASE <name>\\n` lines on the same descriptor mark where each phase starts.

Every row's payload is `payload_for(client_message_id)`, so a checker can
tell a row that survived intact from one that did not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

import trio

from trio_drain import SendRequest, Status, open_outbox
from trio_drain._lifecycle import on_ack

#: What a marker line starts with.
ACK = b"ACK "
PHASE = b"PHASE "

#: The shape of every client_message_id the workload uses, as bytes, for
#: finding them in the pages the database writes.
CLIENT_ID = re.compile(rb"(?:single|caller|many|mixed)-[0-9]{4}-[0-9]{4}")


def client_id(kind: str, a: int, b: int) -> str:
    return f"{kind}-{a:04d}-{b:04d}"


def payload_for(client_message_id: str) -> bytes:
    """The payload the workload gives a row: a function of its id, mostly
    small, about one row in ten large enough to spill onto overflow pages."""
    digest = hashlib.sha256(client_message_id.encode()).digest()
    size = 6000 if digest[0] < 26 else 60 + digest[1]
    return (digest.hex().encode() * (size // 64 + 1))[:size]


def request(client_message_id: str) -> SendRequest:
    return SendRequest(
        mesh="alpha",
        target_spec="*",
        client_message_id=client_message_id,
        payload=payload_for(client_message_id),
    )


class Markers:
    """The marker descriptor: one write system call per marker."""

    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def ack(self, client_message_id: str) -> None:
        os.write(self.fd, ACK + client_message_id.encode() + b"\n")

    def phase(self, name: str) -> None:
        os.write(self.fd, PHASE + name.encode() + b"\n")


async def run(db: Path, args: argparse.Namespace) -> None:
    markers = Markers()
    async with open_outbox(db, durability=args.durability) as outbox:
        markers.phase("single")
        for i in range(args.singles):
            cid = client_id("single", i // 10_000, i % 10_000)
            await outbox.accept(request(cid))
            markers.ack(cid)

        markers.phase("concurrent")

        async def one_caller(cid: str) -> None:
            await outbox.accept(request(cid))
            markers.ack(cid)

        for r in range(args.rounds):
            async with trio.open_nursery() as nursery:
                for c in range(args.callers):
                    nursery.start_soon(one_caller, client_id("caller", r, c))

        markers.phase("many")
        for b in range(args.batches):
            cids = [client_id("many", b, i) for i in range(args.batch_size)]
            await outbox.accept_many([request(cid) for cid in cids])
            for cid in cids:
                markers.ack(cid)

        markers.phase("mixed")
        callers = 8
        accepted_all = trio.Event()

        async def accepting_caller(c: int) -> None:
            for i in range(c, args.mixed, callers):
                cid = client_id("mixed", c, i)
                await outbox.accept(request(cid))
                markers.ack(cid)

        async def drainer() -> None:
            while True:
                claimed = await outbox.claim(limit=16, lease_ms=60_000, max_age_ms=10**12, token="drainer")
                if claimed:
                    now = outbox.clock()
                    await outbox.complete(
                        [on_ack(row, broker_message_id=f"b-{row.id}", now=now) for row in claimed]
                    )
                elif accepted_all.is_set():
                    return
                else:
                    await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drainer)
            async with trio.open_nursery() as accepts:
                for c in range(callers):
                    accepts.start_soon(accepting_caller, c)
            accepted_all.set()
        assert (await outbox.counts())[Status.PENDING.value] == 0
        markers.phase("close")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("db", type=Path, help="the outbox to create (must not exist)")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed", type=int, default=32)
    args = parser.parse_args()
    if args.db.exists():
        parser.error(f"{args.db} exists: the trace must start from no database at all")
    trio.run(run, args.db, args)


if __name__ == "__main__":
    main()
