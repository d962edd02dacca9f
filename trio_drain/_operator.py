"""What an operator does to an outbox: requeue, drop and prune rows, one by
one or by filter, and pause and resume routes, each through the state
machine and each logged, saying who.

`Outbox` inherits these; they read only its back end, its clock and its
listeners.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable

import attrs

from ._display import visible
from ._errors import InvalidRequest
from ._ids import uuid7, uuid7s
from ._lifecycle import DROPPABLE, REQUEUEABLE
from ._model import OutboxRow, Status
from ._store._base import OutboxBackend, Rows
from ._store._operations import CHANGE_BATCH, PRUNE_BATCH
from ._store._reads import SETTLED_AT, Cursor, RowFilter

#: Operator actions (requeue, drop, prune, pause, resume) log a line here,
#: saying who did what: an audit trail beside the rows' ``aborted_by``.
operator_log = logging.getLogger("trio_drain.operator")

#: A status, its name, or several of either.
Statuses = Status | str | Iterable[Status | str] | None

DEFAULT_RETENTION = 7 * 24 * 3600.0


class OperatorActions:
    """The operator's half of `Outbox`."""

    backend: OutboxBackend
    clock: Callable[[], int]

    def _notify(self) -> None:
        raise NotImplementedError

    async def requeue(self, row_id: str, *, by: str = "operator") -> OutboxRow:
        """Abort a pending, inflight or dead row and enqueue a fresh copy.

        The copy has a new client_message_id (so the broker's dedupe does not
        swallow it) and the same payload, fingerprint and routing. Returns
        the new pending row. The old row records `by` as ``aborted_by``, and
        the action is logged (logger ``trio_drain.operator``).

        Raises:
            UnknownRow: no such row.
            InvalidTransition: the row is done or aborted.
        """
        successor = await self.backend.requeue(
            row_id, now=self.clock(), new_id=uuid7(), new_client_message_id=uuid7(), by=by
        )
        operator_log.info(
            "requeued row %s as %s (by %s)", row_id, successor.id, visible(by), extra={"by": by}
        )
        self._notify()
        return successor

    async def drop(self, row_id: str, *, by: str = "operator") -> OutboxRow:
        """Abort a pending or dead row for good. Returns the aborted row,
        which records `by` as ``aborted_by``; the action is logged.

        Raises:
            UnknownRow: no such row.
            InvalidTransition: the row is inflight, done or aborted.
        """
        dropped = await self.backend.drop(row_id, now=self.clock(), by=by)
        operator_log.info("dropped row %s (by %s)", row_id, visible(by), extra={"by": by})
        self._notify()  # the next row of its ordering lane may go now
        return dropped

    async def requeue_matching(
        self,
        status: Statuses = None,
        *,
        mesh: str | None = None,
        lane: str | None = None,
        error: str | None = None,
        older_than: float | None = None,
        by: str = "operator",
    ) -> int:
        """`requeue` every row matching a filter (as `list` takes it).

        Without `status`, pending and dead rows: an inflight row is a
        worker's, and is requeued only when asked for by name
        (``status=["inflight"]``; the worker's answer for it is then
        ignored, and a broker that does not dedupe may get it twice). Rows
        are taken in accept order, in batches of a transaction each; each
        row's change is the state machine's, judged again under its lock (a
        row that changed meanwhile is skipped). Rows accepted after the
        call began, the copies it makes among them, are left alone.

        Returns:
            How many rows were requeued.

        Raises:
            InvalidRequest: no filter at all (that would be every row), a
                status that cannot be requeued, or a bad filter value.
        """
        where = self._bulk_filter(
            "requeue", REQUEUEABLE, status, mesh=mesh, lane=lane, error=error, older_than=older_than
        )
        total = 0
        async for batch in self._batches(where):
            changed = await self.backend.requeue_many(
                [r.id for r in batch],
                now=self.clock(),
                new_ids=list(zip(*[iter(uuid7s(2 * len(batch)))] * 2, strict=True)),
                by=by,
                where=where,
            )
            total += len(changed)
            if changed:
                self._notify()
        operator_log.info("requeued %d row(s) %s (by %s)", total, _describe(where), visible(by))
        return total

    async def drop_matching(
        self,
        status: Statuses = None,
        *,
        mesh: str | None = None,
        lane: str | None = None,
        error: str | None = None,
        older_than: float | None = None,
        by: str = "operator",
    ) -> int:
        """`drop` every pending or dead row matching a filter (as `list`
        takes it), in batches as `requeue_matching` does.

        Returns:
            How many rows were dropped.

        Raises:
            InvalidRequest: no filter at all, a status that cannot be
                dropped, or a bad filter value.
        """
        where = self._bulk_filter(
            "drop", DROPPABLE, status, mesh=mesh, lane=lane, error=error, older_than=older_than
        )
        total = 0
        async for batch in self._batches(where):
            changed = await self.backend.drop_many(
                [r.id for r in batch], now=self.clock(), by=by, where=where
            )
            total += len(changed)
            if changed:
                self._notify()  # the next rows of their lanes may go
        operator_log.info("dropped %d row(s) %s (by %s)", total, _describe(where), visible(by))
        return total

    def _bulk_filter(
        self,
        action: str,
        allowed: frozenset[Status],
        status: Statuses,
        *,
        mesh: str | None,
        lane: str | None,
        error: str | None,
        older_than: float | None,
    ) -> RowFilter:
        where = row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
        if not where:
            raise InvalidRequest(f"{action}: name a filter (status, mesh, lane, error or age)")
        refused = sorted(where.statuses - allowed)
        if refused:
            names = ", ".join(s.value for s in sorted(allowed))
            raise InvalidRequest(f"cannot {action} {' or '.join(refused)} rows; {action} takes {names} rows")
        if not where.statuses:
            return attrs.evolve(where, statuses=allowed - {Status.INFLIGHT})
        return where

    async def _batches(self, where: RowFilter) -> AsyncIterator[Rows]:
        """The rows matching `where`, in accept order, a batch at a time, up
        to the last one that matched when this began.

        Each status is read on its own, in pages along the index by status
        and enqueued_at, and the pages are merged: a batch costs its own
        rows, where one query over several statuses would sort all the
        matching rows left for every batch."""
        newest = await self.backend.list(limit=1, where=where, now=self.clock())
        if not newest:
            return
        end: Cursor = (newest[0].enqueued_at, newest[0].id)
        streams = [attrs.evolve(where, statuses=frozenset({s})) for s in sorted(where.statuses)]
        pages: list[collections.deque[OutboxRow]] = [collections.deque() for _ in streams]
        cursors: list[Cursor | None] = [None] * len(streams)
        ended = [False] * len(streams)
        while True:
            for i, stream in enumerate(streams):
                if pages[i] or ended[i]:
                    continue
                page = await self.backend.list(
                    limit=CHANGE_BATCH, after=cursors[i], where=stream, now=self.clock(), oldest_first=True
                )
                kept = [r for r in page if (r.enqueued_at, r.id) <= end]
                ended[i] = len(kept) < CHANGE_BATCH
                if kept:
                    pages[i].extend(kept)
                    cursors[i] = (kept[-1].enqueued_at, kept[-1].id)
            batch: Rows = []
            while len(batch) < CHANGE_BATCH:
                heads = [(page[0].enqueued_at, page[0].id, i) for i, page in enumerate(pages) if page]
                if not heads:
                    break
                *_, i = min(heads)
                batch.append(pages[i].popleft())
                if not pages[i] and not ended[i]:
                    break  # read that status's next page before going on: the order depends on it
            if not batch:
                return
            yield batch

    async def prune(self, older_than: float = DEFAULT_RETENTION, *, status: Statuses = Status.DONE) -> int:
        """Delete rows that settled more than `older_than` seconds ago.

        By default only done rows (by ``delivered_at``); dead and aborted
        rows are kept for audit unless named in `status` (an aborted row by
        ``aborted_at``; a dead row by its last due time, ``next_attempt_at``,
        as the outbox keeps no time of death). A row aborted in flight in an
        ordering lane is kept while it holds its lane (until its lease runs
        out). Deletes in batches of a transaction each. Returns the rows
        deleted.

        Raises:
            InvalidRequest: a negative age, or a status that is not done,
                dead or aborted.
        """
        if not isinstance(older_than, (int, float)) or isinstance(older_than, bool) or not older_than >= 0:
            raise InvalidRequest(f"older_than must be a non-negative number, got {older_than!r}")
        statuses = _parse_statuses(status) or frozenset({Status.DONE})
        refused = sorted(statuses - set(SETTLED_AT))
        if refused:
            raise InvalidRequest(f"prune takes done, dead and aborted rows, not {' or '.join(refused)}")
        age_ms = _age_ms(older_than)
        now = self.clock()  # one cutoff: rows settling meanwhile never keep it going
        total = 0
        while True:
            deleted = await self.backend.prune(
                older_than_ms=age_ms, now=now, statuses=statuses, limit=PRUNE_BATCH
            )
            total += deleted
            if deleted < PRUNE_BATCH:
                break
        names = ", ".join(s.value for s in sorted(statuses))
        operator_log.info("pruned %d %s row(s) settled over %gs ago", total, names, older_than)
        return total

    # -- paused routes

    async def pause(
        self, *, mesh: str | None = None, session: str | None = None, by: str = "operator"
    ) -> bool:
        """Pause a route: no row of it is claimed until `resume`, by any worker
        of this outbox (within a second). Nothing else changes: no attempt is
        spent, and max_age still applies. Give exactly one of `mesh` (a mesh
        slug: its rows without a session) or `session` (a session public key).

        Returns:
            False if the route was paused already.

        Raises:
            InvalidRequest: neither or both of `mesh` and `session`.
        """
        route = _route(mesh, session)
        paused = await self.backend.pause(route, now=self.clock(), by=by)
        if paused:
            operator_log.info("paused route %s (by %s)", visible(route), visible(by))
        return paused

    async def resume(
        self, *, mesh: str | None = None, session: str | None = None, by: str = "operator"
    ) -> bool:
        """Resume a paused route (as `pause` names it); False if it was not
        paused. `by` is who, for the log line."""
        route = _route(mesh, session)
        resumed = await self.backend.resume(route)
        if resumed:
            operator_log.info("resumed route %s (by %s)", visible(route), visible(by))
        self._notify()
        return resumed

    async def paused(self) -> frozenset[str]:
        """The paused routes, as ``"mesh:<slug>"`` and ``"session:<pubkey>"``."""
        return frozenset(await self.backend.paused())

    async def paused_routes(self) -> dict[str, tuple[int, str]]:
        """The paused routes (named as `paused` names them), each with when
        it was paused (ms since the epoch) and by whom."""
        return await self.backend.paused()


def _parse_status(status: Status | str | None) -> Status | None:
    if status is None or isinstance(status, Status):
        return status
    try:
        return Status(status)
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise InvalidRequest(f"unknown status {status!r}; expected one of {names}") from None


def _parse_statuses(status: Statuses) -> frozenset[Status]:
    """The statuses `status` names (one, or several); empty for None."""
    if status is None:
        return frozenset()
    names = [status] if isinstance(status, str) else status  # a Status is a str too
    return frozenset(parsed for s in names if (parsed := _parse_status(s)) is not None)


def row_filter(
    status: Statuses,
    *,
    mesh: str | None,
    lane: str | None,
    error: str | None,
    older_than: float | None,
) -> RowFilter:
    for name, value in (("mesh", mesh), ("lane", lane), ("error", error)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidRequest(f"{name} must be a non-empty string, got {value!r}")
    return RowFilter(
        statuses=_parse_statuses(status),
        mesh=mesh,
        lane=lane,
        error=error,
        older_than_ms=None if older_than is None else _age_ms(older_than),
    )


def _age_ms(seconds: float) -> int:
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise InvalidRequest(f"an age must be a non-negative number of seconds, got {seconds!r}")
    return round(seconds * 1000)


def _describe(where: RowFilter) -> str:
    """A filter in words, for the log line of a bulk action."""
    words = ["with status " + " or ".join(s.value for s in sorted(where.statuses))]
    if where.mesh is not None:
        words.append(f"of mesh {visible(where.mesh)}")
    if where.lane is not None:
        words.append(f"of lane {visible(where.lane)}")
    if where.error is not None:
        words.append(f"with an error containing {visible(repr(where.error))}")
    if where.older_than_ms is not None:
        words.append(f"enqueued over {where.older_than_ms / 1000:g}s ago")
    return ", ".join(words)


def _route(mesh: str | None, session: str | None) -> str:
    """A route's name as the paused-routes table keeps it."""
    if (mesh is None) == (session is None):
        raise InvalidRequest("name one route: mesh or session")
    name, value = ("mesh", mesh) if mesh is not None else ("session", session)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidRequest(f"{name} must be a non-empty string of at most 256 characters")
    return f"{name}:{value}"
