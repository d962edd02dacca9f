"""The public face of the outbox: `open_outbox` and `Outbox`.

`Outbox` validates, fingerprints and mints ids, then hands prepared rows to
a storage back end. It also exposes the worker-facing calls (claim,
complete, sweeps) that `DrainWorker` drives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import islice
from pathlib import Path
from typing import NoReturn, Protocol, runtime_checkable

from ._clock import wall_clock_ms
from ._errors import ConfigError, InvalidRequest
from ._ids import uuid7s
from ._lifecycle import Completion, UnknownFate
from ._model import AcceptOutcome, NewRow, OutboxRow, SendRequest
from ._operator import OperatorActions, Statuses, row_filter
from ._store._base import NO_FILTER, Applied, Durability, OutboxBackend, Outcomes, RouteFilter, Rows
from ._store._overview import Overview, read_overview
from ._store._reads import Cursor
from ._store._sqlite._backend import SqliteBackend
from ._validate import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD, prepare_row

#: Most rows `list` returns at once.
MAX_LIST_LIMIT = 10_000


@runtime_checkable
class _ValidatesAsItWrites(Protocol):
    """A back end that takes a big batch (of `stream_from` rows or more) as
    it is validated: `take(k)` validates and returns the next `k` rows
    (fewer at the end, none once done), raising InvalidRequest for a
    malformed request, and the back end writes each chunk while the next is
    validated (the PostgreSQL store), committing once all are in."""

    stream_from: int

    async def accept_prepared(self, take: Callable[[int], list[NewRow]]) -> Outcomes: ...


class Outbox(OperatorActions):
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
        # Asked once: a runtime protocol check costs about 20 µs, a tenth of
        # a single accept's CPU on PostgreSQL.
        self._streamer = backend if isinstance(backend, _ValidatesAsItWrites) else None

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

        Every request is validated before anything is committed: a malformed
        one raises InvalidRequest and nothing is written.
        """
        now = self.clock()
        max_payload, max_message_bytes = self.max_payload, self.max_message_bytes
        streamer = self._streamer
        if streamer is not None and len(requests) >= streamer.stream_from:
            # A big batch is validated chunk by chunk as the back end writes it.
            pending = zip(requests, uuid7s(len(requests)), strict=True)

            def take(count: int) -> list[NewRow]:
                return [
                    prepare_row(
                        r,
                        now=now,
                        max_payload=max_payload,
                        max_message_bytes=max_message_bytes,
                        row_id=row_id,
                    )
                    for r, row_id in islice(pending, count)
                ]

            outcomes = await streamer.accept_prepared(take)
        else:
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
        where = row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
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
        where = row_filter(status, mesh=mesh, lane=lane, error=error, older_than=older_than)
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


def _cursor(place: int | OutboxRow | None) -> int | Cursor | None:
    if place is None or isinstance(place, OutboxRow):
        return None if place is None else (place.enqueued_at, place.id)
    if not isinstance(place, int) or isinstance(place, bool):
        raise InvalidRequest(f"a cursor is a row or a time in ms, got {place!r}")
    return place


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
