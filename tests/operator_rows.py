"""Outboxes an operator meets, for the tests of the operator's commands:
rows of two meshes and a lane, some dead of known errors; and the command
line run in this process (fast: no interpreter to start)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

import attrs
import trio

from trio_drain import _lifecycle as lc
from trio_drain._cli._main import main
from trio_drain._clock import wall_clock_ms
from trio_drain._outbox import Outbox

from .builders import BIG, req
from .helpers import FakeClock
from .pg import open_clocked_outbox

POLICY = lc.RetryPolicy(max_attempts=3, backoff_base_ms=100, backoff_cap_ms=100, lease_ms=1000)
MINUTE = 60_000

#: The rows `a_mixed_outbox` makes: client id, mesh, lane; a minute apart.
MIXED = [
    ("a-dead-1", "alpha", None),
    ("a-dead-2", "alpha", None),
    ("b-dead", "beta", None),
    ("a-pend", "alpha", None),
    ("b-pend", "beta", None),
    ("c-0", "alpha", "conv"),
    ("c-1", "alpha", "conv"),
]


async def kill(ob: Outbox, clock: FakeClock, cid: str, error: str) -> None:
    """Claim the row `cid` and let it die of `error` (the other rows claimed
    with it go back to pending, their attempt given back)."""
    rows = await ob.claim(limit=50, lease_ms=POLICY.lease_ms, max_age_ms=BIG, token="t")
    wanted = [r for r in rows if r.client_message_id == cid]
    assert wanted, f"{cid} was not claimable"
    await ob.complete(
        [lc.on_error(wanted[0], error=error, permanent=True, now=clock.now, policy=POLICY, jitter=0)]
    )
    await ob.complete(
        [
            lc.on_released(r, sent=False, now=clock.now, policy=POLICY)
            for r in rows
            if r.client_message_id != cid
        ]
    )


async def a_mixed_outbox(ob: Outbox, clock: FakeClock) -> None:
    """`MIXED`, then a-dead-1 dead of ``forbidden: not a member``, a-dead-2
    of ``payload too large: 70000 bytes``, b-dead of ``forbidden: blocked``."""
    for cid, mesh, lane in MIXED:
        await ob.accept(req(cid, mesh=mesh, ordering_key=lane))
        clock.advance(MINUTE)
    await kill(ob, clock, "a-dead-1", "forbidden: not a member")
    await kill(ob, clock, "a-dead-2", "payload too large: 70000 bytes")
    await kill(ob, clock, "b-dead", "forbidden: blocked")


def make_mixed_outbox(target: str, *, minutes_ago: int = 60) -> dict[str, str]:
    """`a_mixed_outbox` at `target`, its first row accepted `minutes_ago`
    minutes ago by the real clock. Returns each client id's row id."""

    async def make() -> dict[str, str]:
        clock = FakeClock(now=wall_clock_ms() - minutes_ago * MINUTE)
        async with open_clocked_outbox(target, clock) as ob:
            await a_mixed_outbox(ob, clock)
            return {r.client_message_id: r.id for r in await ob.list(limit=100)}

    return trio.run(make)


@attrs.frozen
class Result:
    """What a command did: its exit status, stdout and stderr."""

    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def cli(*args: str, stdin: bytes = b"") -> Result:
    """Run `trio-drain ARGS` in this process (the same code as the console
    script, a fraction of the time), with `stdin` as its standard input."""
    out, err = io.StringIO(), io.StringIO()
    stdin_file = io.TextIOWrapper(io.BytesIO(stdin))
    status = 0
    with _logging_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old_stdin, sys.stdin = sys.stdin, stdin_file
        try:
            main(list(args))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdin = old_stdin
    return Result(status, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Put the library's loggers back as they were after `main` set them up."""
    loggers = [logging.getLogger("trio_drain"), logging.getLogger("trio_drain.operator")]
    saved = [(lg.handlers[:], lg.level) for lg in loggers]
    try:
        yield
    finally:
        for lg, (handlers, level) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)
