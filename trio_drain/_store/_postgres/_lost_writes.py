"""Outcome writes whose COMMIT went unanswered (the connection dropped with
the answer on its way), kept until the caller's retry settles them.

The completer retries a failed write with the same completions. Before
writing them afresh, the back end asks here whether an earlier write of
them may have committed: if so, the server is asked (`_pool.committed`, by
the transaction's id) and, when it did commit, its answer is returned with
the rows it claimed that are still held under its lease, so that nothing is
written twice and no claimed row is stranded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg

from ..._errors import StoreUnavailable
from ..._lifecycle import Completion
from .._base import Applied, Rows, in_claim_order
from ._pool import Commit, Pool, committed
from ._statements import HELD

log = logging.getLogger("trio_drain.postgres")

#: Unsettled writes kept at most (the oldest goes first).
MAX_LOST = 16

OutcomeKey = tuple[tuple[str, str], ...]


def outcome_key(completions: Sequence[Completion]) -> OutcomeKey:
    return tuple((c.row_id, c.lease_token) for c in completions)


@attrs.define(eq=False)
class LostWrite:
    """An outcome write (complete or complete_and_claim) whose COMMIT went
    unanswered, not yet settled."""

    commit: Commit
    applied: Applied  # its answer, had it committed
    token: str | None  # its claim's lease token, if it claimed rows


@attrs.define
class LostWrites:
    """The unsettled outcome writes of one back end, by their completions."""

    _writes: dict[OutcomeKey, LostWrite] = attrs.field(factory=dict)

    def remember(
        self, completions: Sequence[Completion], commit: Commit, *, applied: Applied, token: str | None
    ) -> None:
        """Keep an outcome write whose commit went unanswered for the retry."""
        while len(self._writes) >= MAX_LOST:
            del self._writes[next(iter(self._writes))]
        self._writes[outcome_key(completions)] = LostWrite(commit, applied, token)

    async def settle(self, completions: Sequence[Completion], pool: Pool) -> tuple[Applied, Rows] | None:
        """If an earlier write of these same completions went unanswered at
        commit and is still unsettled, find out what it did: its answer and
        the rows it claimed that are still held under its lease, if it
        committed; None if it did not (write them afresh)."""
        if not self._writes:
            return None
        key = outcome_key(completions)
        lost = self._writes.pop(key, None)
        if lost is None:
            return None

        def op(conn: psycopg.Connection[Any]) -> tuple[bool, Rows]:
            if not committed(conn, lost.commit):
                return False, []
            if lost.token is None:
                return True, []
            return True, in_claim_order(conn.execute(HELD, (lost.token,)).fetchall())

        try:
            done, rows = await pool.run(op)
        except StoreUnavailable:
            self._writes[key] = lost
            raise
        if not done:
            return None
        log.info(
            "an outcome write whose commit went unanswered was applied; %d row(s) it claimed are still held",
            len(rows),
        )
        return lost.applied, rows
