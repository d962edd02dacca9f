"""The public face of the outbox: `open_outbox` and `Outbox`.

`Outbox` validates, fingerprints and mints ids, then hands prepared rows to
a storage back end. It also exposes the worker-facing calls (claim,
complete, sweeps) that `DrainWorker` drives.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

import attrs

from ._clock import wall_clock_ms
from ._display import visible
from ._errors import ConfigError, InvalidRequest
from ._ids import uuid7, uuid7s
from ._lifecycle import DROPPABLE, REQUEUEABLE, Completion, UnknownFate
from ._model import AcceptOutcome, OutboxRow, SendRequest, Status
from ._store._base import NO_FILTER, Applied, Durability, OutboxBackend, Outcomes, RouteFilter, Rows
from ._store._operations import CHANGE_BATCH, PRUNE_BATCH, SETTLED_AT, Cursor, RowFilter
from ._store._overview import Overview, read_overview
from ._store._sqlite._backend import SqliteBackend
from ._validate import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD, prepare_row

#: Most rows `list` returns at once.
MAX_LIST_LIMIT = 10_000
DEFAULT_RETENTION = 7 * 24 * 3600.0

#: Operator actions (requeue, drop, prune, pause, resume) log a line here,
#: saying who did what: an audit trail beside the rows' ``aborted_by``.
operator_log = logging.getLogger("trio_drain.operator")

#: A status, its name, or several of either.
Statuses = Status | str | Iterable[Status | str] | None


class Outbox:
    """A durable outbox. Open one with `open_outbox`.

    Every method is safe to call concurrently from many tasks. Concurrent
    `accept` calls share commits (group commit).
    """

    def __init__(
        self,
        backend: OutboxBackend,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        description: str = "",
    ) -> None:
        for name, value in (("max_payload", max_payload), ("max_message_bytes", max_message_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.backend = backend
        self.clock = clock
        self.max_payload = max_payload
        self.max_message_bytes = max_message_bytes
        self.description = description
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Outbox {self.description}>"

    # -- host application side

    async def accept(self, request: SendRequest) -> AcceptOutcome:
        """Commit `request` to the outbox, idempotently; return at once.

        The row is durable when this returns (fsynced, unless the outbox was
        opened with `durability="normal"`).

        Raises:
            InvalidRequest: the request is malformed; nothing was written and
                its client_message_id was not consumed.
            StoreError: the database failed; nothing was written.
        """
        (outcome,) = await self.accept_many([request])
        return outcome

    async def accept_many(self, requests: Sequence[SendRequest]) -> Outcomes:
        """Accept several requests in one transaction: all are written or none.

        Every request is validated before anything is written.
        """
        now = self.clock()
        max_payload, max_message_bytes = self.max_payload, self.max_message_bytes
        rows = [
            prepare_row(
                r, now=now, max_payload=max_payload, max_message_bytes=max_message_bytes, row_id=row_id
            )
            for r, row_id in zip(requests, uuid7s(len(requests)), strict=True)
        ]
        if not rows:
            return []
        outcomes = await self.backend.accept_many(rows)
        if any(o.inserted for o in outcomes):
            self._notify()
        return outcomes

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` (synchronously, on the Trio thread) after accepts
        that insert rows. `DrainWorker` uses this to wake at once."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    # -- inspection

    async def get(self, row_id: str) -> OutboxRow | None:
        """The row with this id, or None."""
        return await self.backend.get(row_id)

    async def get_by_client_id(self, client_message_id: str) -> OutboxRow | None:
        """The row holding this client_message_id, or None."""
        return await self.backend.get_by_client_id(client_message_id)

    async def list(
        self,
        status: Statuses = None,
        *,
        limit: int = 100,
        before: int | OutboxRow | None = None,
        after: int | OutboxRow | None = None,
        mesh: str | None = None,
        lane: str | None = None,
        error: str | None = None,
        older_than: float | None = None,
        oldest_first: bool = False,
    ) -> Rows:
        """Rows newest first (oldest first if `oldest_first`), optionally
        only those matching a filter.

        Args:
            status: one of the five status names, several, or None for all.
            limit: at most this many rows (1 to 10,000).
            before: only rows accepted before this row, or before this time
                (ms): the next page of a newest-first listing is
                ``before=rows[-1]``.
            after: only rows accepted after this row, or after this time
                (ms): the next page of an oldest-first listing is
                ``after=rows[-1]``.
            mesh: only rows of this mesh slug.
            lane: only rows of this ordering lane (``ordering_key``).
            error: only rows whose ``last_error`` contains this text.
            older_than: only rows enqueued at least this many seconds ago.
            oldest_first: list in accept order instead of newest first.

        Raises:
            InvalidRequest: an unknown status, a limit out of range, or a
                bad filter value.
        """
        where = _row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}")
        return await self.backend.list(
            limit=limit,
            before=_cursor(before),
            after=_cursor(after),
            where=where,
            now=self.clock(),
            oldest_first=oldest_first,
        )

    async def count(
        self,
        status: Statuses = None,
        *,
        mesh: str | None = None,
        lane: str | None = None,
        error: str | None = None,
        older_than: float | None = None,
    ) -> int:
        """How many rows match the filter (as `list` takes it).

        Raises:
            InvalidRequest: an unknown status or a bad filter value.
        """
        where = _row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
        return await self.backend.count(where=where, now=self.clock())

    async def get_by_id_prefix(self, prefix: str, *, limit: int = 10) -> Rows:
        """Rows whose id starts with `prefix`, in id order, at most `limit`:
        what an operator's short id (`short_ids`) may name. A scan of the
        ids, for an operator's look-up."""
        if not isinstance(prefix, str) or not prefix:
            raise InvalidRequest("an id prefix must be a non-empty string")
        return await self.backend.with_id_prefix(prefix, limit=limit)

    async def short_ids(self, row_ids: Sequence[str], *, minimum: int = 8) -> dict[str, str]:
        """Each row id's shortest prefix, of at least `minimum` characters,
        that no other row's id starts with today (the id itself where no
        prefix is shorter), as git shortens hashes. A row added later may
        make a prefix ambiguous: look-ups by prefix must check
        (`get_by_id_prefix`)."""
        return await self.backend.short_ids(list(row_ids), minimum=minimum)

    async def counts(self) -> dict[str, int]:
        """Rows per status, with all five status keys present."""
        return await self.backend.counts()

    async def overview(self, *, counts: bool = True, routes: bool = True, dead_rows: int = 5) -> Overview:
        """What an operator's view shows, in one read: the oldest pending
        row's age, the paused routes and the newest `dead_rows` dead rows
        (each a few index steps, whatever the outbox holds), and if asked,
        the counts per status (a walk of the status index: about 50 ms for
        a million rows on SQLite) and the rows per route (which reads every
        pending, inflight and dead row). ``trio-drain top`` and
        `MetricsCollector` run the costly parts less often as they grow.

        Returns:
            An `Overview`; the parts not asked for are None.
        """
        if not isinstance(dead_rows, int) or not 0 <= dead_rows <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"dead_rows must be between 0 and {MAX_LIST_LIMIT}, got {dead_rows!r}")
        return await read_overview(
            self.backend, now=self.clock(), counts=counts, routes=routes, dead_rows=dead_rows
        )

    # -- operator actions

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
        where = _row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
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
        as the outbox keeps no time of death). Deletes in batches of a
        transaction each. Returns the rows deleted.

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

    # -- the worker's side

    async def claim(
        self,
        *,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> Rows:
        return await self.backend.claim(
            now=self.clock(),
            limit=limit,
            lease_ms=lease_ms,
            max_age_ms=max_age_ms,
            token=token,
            exclude=exclude,
        )

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        return await self.backend.complete(completions)

    async def complete_and_claim(
        self,
        completions: Sequence[Completion],
        *,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> tuple[Applied, Rows]:
        """Record outcomes and claim more rows in one transaction: the worker
        refills the send slots a batch of outcomes frees with no second
        round trip to the database."""
        return await self.backend.complete_and_claim(
            completions,
            now=self.clock(),
            limit=limit,
            lease_ms=lease_ms,
            max_age_ms=max_age_ms,
            token=token,
            exclude=exclude,
        )

    async def recover_expired_leases(self, *, max_attempts: int, unknown_fate: UnknownFate = "resend") -> int:
        return await self.backend.recover_expired_leases(
            now=self.clock(), max_attempts=max_attempts, unknown_fate=unknown_fate
        )

    async def expire_stale(self, *, max_age_ms: int) -> int:
        return await self.backend.expire_stale(now=self.clock(), max_age_ms=max_age_ms)

    async def next_due_at(self, *, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        return await self.backend.next_due_at(now=self.clock(), max_age_ms=max_age_ms, exclude=exclude)

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """Call `wake` whenever another process may have added rows (PostgreSQL
        LISTEN/NOTIFY); runs until cancelled. `DrainWorker` runs this."""
        await self.backend.watch(wake)

    async def aclose(self) -> None:
        await self.backend.aclose()


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


def _row_filter(
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


def _cursor(place: int | OutboxRow | None) -> int | Cursor | None:
    if place is None or isinstance(place, OutboxRow):
        return None if place is None else (place.enqueued_at, place.id)
    if not isinstance(place, int) or isinstance(place, bool):
        raise InvalidRequest(f"a cursor is a row or a time in ms, got {place!r}")
    return place


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


def parse_target(target: str | Path) -> tuple[str, str]:
    """('sqlite', path) or ('postgresql', dsn) from a path or URL."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql", text
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(f"malformed SQLite URL {text!r}: use sqlite:///relative or sqlite:////absolute")
        return "sqlite", rest[1:]
    if "://" in text:
        raise ConfigError(f"unsupported outbox URL {text!r}: use a path, sqlite:/// or postgresql://")
    if not text:
        raise ConfigError("the outbox path is empty")
    return "sqlite", text


@asynccontextmanager
async def open_outbox(
    target: str | Path,
    *,
    durability: Durability = "full",
    clock: Callable[[], int] | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncIterator[Outbox]:
    """Open (creating or migrating as needed) the outbox at `target`.

    Args:
        target: a file path, ``sqlite:///relative/path``,
            ``sqlite:////absolute/path`` or ``postgresql://...``.
        durability: ``"full"`` (default) fsyncs every commit and survives
            power loss; ``"normal"`` survives a process crash only.
        clock: milliseconds since the epoch; tests pass a fake one.
        max_payload: largest payload `accept` takes, in bytes.
        max_message_bytes: the broker's limit on a send frame's ciphertext,
            nonce and target, in characters (65,536 at the seed's real
            broker); `accept` refuses a request whose frame would exceed it.

    Raises:
        CorruptDatabase: the file failed its integrity check (left untouched).
        StoreError: the database cannot be opened.
        ConfigError: `target` is malformed.
    """
    kind, location = parse_target(target)
    if not isinstance(max_message_bytes, int) or isinstance(max_message_bytes, bool) or max_message_bytes < 1:
        raise ConfigError(f"max_message_bytes must be a positive integer, got {max_message_bytes!r}")
    backend: OutboxBackend
    if kind == "sqlite":
        backend = await SqliteBackend.open(location, durability=durability)
        description = f"sqlite:{location}"
    else:
        # Imported here: SQLite users do not pay for loading psycopg.
        from ._store._postgres._backend import PostgresBackend

        backend = await PostgresBackend.open(location, durability=durability)
        description = backend.where
    outbox = Outbox(
        backend,
        clock=clock or wall_clock_ms,
        max_payload=max_payload,
        max_message_bytes=max_message_bytes,
        description=description,
    )
    try:
        yield outbox
    finally:
        await outbox.aclose()


def _route(mesh: str | None, session: str | None) -> str:
    """A route's name as the paused-routes table keeps it."""
    if (mesh is None) == (session is None):
        raise InvalidRequest("name one route: mesh or session")
    name, value = ("mesh", mesh) if mesh is not None else ("session", session)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidRequest(f"{name} must be a non-empty string of at most 256 characters")
    return f"{name}:{value}"
