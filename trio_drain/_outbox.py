"""The public face of the outbox: `open_outbox` and `Outbox`.

`Outbox` validates, fingerprints and mints ids, then hands prepared rows to
a storage back end. It also exposes the worker-facing calls (claim,
complete, sweeps) that `DrainWorker` drives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

from ._clock import wall_clock_ms
from ._errors import ConfigError, InvalidRequest
from ._ids import uuid7, uuid7s
from ._lifecycle import Completion, UnknownFate
from ._model import AcceptOutcome, OutboxRow, SendRequest, Status
from ._store._base import NO_FILTER, Applied, Durability, OutboxBackend, Outcomes, RouteFilter, Rows
from ._store._sqlite._backend import SqliteBackend
from ._validate import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD, prepare_row

#: Most rows `list` returns at once.
MAX_LIST_LIMIT = 10_000
DEFAULT_RETENTION = 7 * 24 * 3600.0


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
        self, status: Status | str | None = None, *, limit: int = 100, before: int | None = None
    ) -> Rows:
        """Rows newest first, optionally only those of one status.

        Args:
            status: one of the five status names, or None for all.
            limit: at most this many rows (1 to 10,000).
            before: only rows enqueued before this time (ms), for paging.

        Raises:
            InvalidRequest: unknown status or limit out of range.
        """
        parsed = _parse_status(status)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}")
        return await self.backend.list(status=parsed, limit=limit, before=before)

    async def counts(self) -> dict[str, int]:
        """Rows per status, with all five status keys present."""
        return await self.backend.counts()

    # -- operator actions

    async def requeue(self, row_id: str, *, by: str = "operator") -> OutboxRow:
        """Abort a pending, inflight or dead row and enqueue a fresh copy.

        The copy has a new client_message_id (so the broker's dedupe does not
        swallow it) and the same payload, fingerprint and routing. Returns
        the new pending row.

        Raises:
            UnknownRow: no such row.
            InvalidTransition: the row is done or aborted.
        """
        successor = await self.backend.requeue(
            row_id, now=self.clock(), new_id=uuid7(), new_client_message_id=uuid7(), by=by
        )
        self._notify()
        return successor

    async def drop(self, row_id: str, *, by: str = "operator") -> OutboxRow:
        """Abort a pending or dead row for good. Returns the aborted row.

        Raises:
            UnknownRow: no such row.
            InvalidTransition: the row is inflight, done or aborted.
        """
        dropped = await self.backend.drop(row_id, now=self.clock(), by=by)
        self._notify()  # the next row of its ordering lane may go now
        return dropped

    async def prune(self, older_than: float = DEFAULT_RETENTION) -> int:
        """Delete done rows delivered more than `older_than` seconds ago.

        Dead and aborted rows are kept for audit. Returns the rows deleted.
        """
        if not isinstance(older_than, (int, float)) or older_than < 0:
            raise InvalidRequest(f"older_than must be a non-negative number, got {older_than!r}")
        return await self.backend.prune(delivered_before=self.clock() - int(older_than * 1000))

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
        return await self.backend.pause(_route(mesh, session), now=self.clock(), by=by)

    async def resume(self, *, mesh: str | None = None, session: str | None = None) -> bool:
        """Resume a paused route (as `pause` names it); False if it was not paused."""
        resumed = await self.backend.resume(_route(mesh, session))
        self._notify()
        return resumed

    async def paused(self) -> frozenset[str]:
        """The paused routes, as ``"mesh:<slug>"`` and ``"session:<pubkey>"``."""
        return frozenset(await self.backend.paused())

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
