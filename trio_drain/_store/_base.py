"""The interface every outbox back end implements.

Back ends persist the decisions of the lifecycle module; they decide
nothing themselves. Times are integers of milliseconds since the epoch.

Whose clock: SQLite (one host) uses the `now` the caller passes, so it runs
under a fake clock in tests. PostgreSQL, shared by hosts whose clocks may
disagree, judges due times, lease expiry and max_age by the database
server's clock and stamps accepted rows with it; there the `now` arguments
decide nothing and serve only to translate between the caller's clock and
the server's (see each method and `_postgres`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

import attrs

from .._errors import SchemaError, StoreError
from .._lifecycle import Completion, UnknownFate
from .._model import AcceptOutcome, NewRow, OutboxRow, Status

if TYPE_CHECKING:
    from ._operations import Requeued
    from ._reads import Cursor, RowFilter

Rows = list[OutboxRow]
Outcomes = list[AcceptOutcome]
Applied = list[bool]

#: Columns of the outbox table that OutboxRow carries, in order.
COLUMNS: tuple[str, ...] = tuple(a.name for a in attrs.fields(OutboxRow))
#: The columns a new row sets (`NewRow`'s fields); the rest start NULL.
NEW_COLUMNS: tuple[str, ...] = NewRow._fields
_NEW_AT = tuple(COLUMNS.index(c) for c in NEW_COLUMNS)
_ENQUEUED_AT = COLUMNS.index("enqueued_at")

#: A row's values in column order, read at C speed. Status is a str enum, so
#: sqlite3 binds it as its text (psycopg does not: see the PostgreSQL store).
row_values: Callable[[OutboxRow], tuple[Any, ...]] = operator.attrgetter(*COLUMNS)


def new_row_values(row: NewRow) -> tuple[Any, ...]:
    """A new row's values for every column in `COLUMNS` order (None where it sets none)."""
    values: list[Any] = [None] * len(COLUMNS)
    for at, value in zip(_NEW_AT, row, strict=True):
        values[at] = value
    return tuple(values)


#: "full" fsyncs every commit the caller was promised (survives power loss);
#: "normal" survives a process crash only.
Durability = Literal["full", "normal"]

#: The schema both back ends write, kept in the table `trio_drain_schema`.
#: 1: the outbox table. 2: ordering lanes (`ordering_key`, `lane_blocked`)
#: and paused routes (`trio_drain_paused`). 3: the lane index holds every row
#: of a lane (`_lanes`), and a lane's head is no longer indexed apart.
SCHEMA_VERSION = 3

#: Version 2's table changes, the same SQL on SQLite and PostgreSQL. A row
#: with `lane_blocked = 1` waits behind an earlier row of its ordering lane
#: (`_lifecycle.FirstInLane`); the claim and due indexes leave it out.
SCHEMA_2 = (
    "ALTER TABLE outbox ADD COLUMN ordering_key TEXT",
    "ALTER TABLE outbox ADD COLUMN lane_blocked INTEGER NOT NULL DEFAULT 0",
    "DROP INDEX IF EXISTS outbox_claim",
    "DROP INDEX IF EXISTS outbox_due",
    "CREATE TABLE IF NOT EXISTS trio_drain_paused ("
    " route TEXT PRIMARY KEY, paused_at BIGINT NOT NULL, paused_by TEXT NOT NULL)",
)

#: Version 3's: the lane indexes of version 2 go (`INDEXES` makes the new one).
SCHEMA_3 = (
    "DROP INDEX IF EXISTS outbox_lane",
    "DROP INDEX IF EXISTS outbox_lane_head",
)

#: Partial indexes in claim order, due order and lease order, the listing
#: index, and the lanes' (every row of a lane in order: no status in it, so
#: a claim or an outcome never writes to it); the same statements work on
#: SQLite and PostgreSQL.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS outbox_claim ON outbox (priority_rank, enqueued_at)"
    " WHERE status = 'pending' AND lane_blocked = 0",
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at) WHERE status = 'pending' AND lane_blocked = 0",
    "CREATE INDEX IF NOT EXISTS outbox_lease ON outbox (lease_expires_at) WHERE status = 'inflight'",
    "CREATE INDEX IF NOT EXISTS outbox_status_enqueued ON outbox (status, enqueued_at)",
    "CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (ordering_key, enqueued_at, id) WHERE ordering_key IS NOT NULL",
    # Rows aborted in flight that hold their lanes until their leases run
    # out (`_lifecycle.LANE_HOLD_RAN_OUT`): nearly always empty.
    "CREATE INDEX IF NOT EXISTS outbox_lane_hold ON outbox (lease_expires_at)"
    " WHERE status = 'aborted' AND lease_expires_at IS NOT NULL",
)


class Executes(Protocol):
    """What the shared helpers need of a connection (sqlite3 or psycopg)."""

    def execute(self, sql: Any, parameters: Any = ..., /) -> Any: ...


#: A route as the stores see it: ("session", pubkey), ("mesh", slug), or
#: ("default", None) for rows with neither (they go to the only mesh broker).
RouteKey = tuple[str, str | None]


def route_key(row: OutboxRow) -> RouteKey:
    """The route a row belongs to (which connection it may leave through)."""
    if row.sender_session_pubkey is not None:
        return ("session", row.sender_session_pubkey)
    if row.mesh is not None:
        return ("mesh", row.mesh)
    return ("default", None)


@attrs.frozen
class RouteFilter:
    """Routes whose rows a claim must leave alone (their socket is down, or
    they are paced and claimed on their own), or the one route it takes.

    Attributes:
        sessions: sender session public keys whose rows are left alone.
        meshes: mesh slugs whose rows (without a session) are left alone.
        null_mesh: rows with neither a session nor a mesh are left alone.
        only: if set, the claim takes rows of this route and no other.
    """

    sessions: frozenset[str] = frozenset()
    meshes: frozenset[str] = frozenset()
    null_mesh: bool = False
    only: RouteKey | None = None

    def __bool__(self) -> bool:
        return bool(self.sessions or self.meshes or self.null_mesh or self.only)

    def blocks(self, row: OutboxRow) -> bool:
        if self.only is not None and route_key(row) != self.only:
            return True
        if row.sender_session_pubkey is not None:
            return row.sender_session_pubkey in self.sessions
        if row.mesh is not None:
            return row.mesh in self.meshes
        return self.null_mesh

    @classmethod
    def of(cls, keys: Iterable[RouteKey], *, only: RouteKey | None = None) -> RouteFilter:
        """A filter leaving out the routes `keys`."""
        keys = set(keys)
        return cls(
            sessions=frozenset(k for kind, k in keys if kind == "session" and k),
            meshes=frozenset(k for kind, k in keys if kind == "mesh" and k),
            null_mesh=("default", None) in keys,
            only=only,
        )


NO_FILTER = RouteFilter()


_STATUS_BY_TEXT = {s.value: s for s in Status}
# row_from_values below reads the columns by position, in this order.
assert COLUMNS == (
    "id",
    "client_message_id",
    "request_fingerprint",
    "payload",
    "enqueued_at",
    "attempts",
    "next_attempt_at",
    "status",
    "last_error",
    "delivered_at",
    "broker_message_id",
    "aborted_at",
    "aborted_by",
    "superseded_by",
    "mesh",
    "target_spec",
    "nonce",
    "ciphertext",
    "priority",
    "sender_session_pubkey",
    "lease_expires_at",
    "lease_token",
    "ordering_key",
), "OutboxRow's fields moved: update row_from_values"


def row_from_values(v: Sequence[Any]) -> OutboxRow:
    """An OutboxRow from one database row read in `COLUMNS` order (values
    after those are ignored). Spelled out field by field: it runs for every
    row claimed, and is about twice as fast as building a dict."""
    return OutboxRow(
        id=v[0],
        client_message_id=v[1],
        request_fingerprint=bytes(v[2]),
        payload=bytes(v[3]),
        enqueued_at=v[4],
        attempts=v[5],
        next_attempt_at=v[6],
        status=_STATUS_BY_TEXT[v[7]],
        last_error=v[8],
        delivered_at=v[9],
        broker_message_id=v[10],
        aborted_at=v[11],
        aborted_by=v[12],
        superseded_by=v[13],
        mesh=v[14],
        target_spec=v[15],
        nonce=v[16],
        ciphertext=v[17],
        priority=v[18],
        sender_session_pubkey=v[19],
        lease_expires_at=v[20],
        lease_token=v[21],
        ordering_key=v[22],
    )


def in_claim_order(found: Sequence[Sequence[Any]]) -> Rows:
    """Rows returned by a claim (COLUMNS then priority_rank), in claim order:
    UPDATE ... RETURNING does not keep the order of the rows it picked."""
    ordered = sorted(found, key=lambda r: (r[-1], r[_ENQUEUED_AT]))
    return [row_from_values(r) for r in ordered]  # it reads COLUMNS and ignores the rank after them


def check_durability(durability: str) -> None:
    if durability not in ("full", "normal"):
        raise StoreError(f"durability must be 'full' or 'normal', got {durability!r}")


def schema_version(conn: Executes) -> int:
    """The stored schema version (0 for none), refusing one newer than ours.
    Call inside the migration's transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS trio_drain_schema (version INTEGER NOT NULL)")
    found = conn.execute("SELECT version FROM trio_drain_schema").fetchone()
    version = 0 if found is None else int(found[0])
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the outbox schema is version {version}; this trio-drain knows up to"
            f" {SCHEMA_VERSION}: upgrade trio-drain"
        )
    return version


def record_schema_version(conn: Executes, *, mark: str) -> None:
    """Store SCHEMA_VERSION; `mark` is the driver's placeholder (? or %s)."""
    conn.execute("DELETE FROM trio_drain_schema")
    conn.execute(f"INSERT INTO trio_drain_schema (version) VALUES ({mark})", (SCHEMA_VERSION,))


class OutboxBackend(Protocol):
    """What a storage back end provides. All methods are safe to call
    concurrently from many Trio tasks; none blocks the Trio thread."""

    async def accept_many(self, rows: Sequence[NewRow]) -> Outcomes:
        """Insert each prepared pending row unless its client_message_id exists,
        applying the idempotency table, all in one transaction. PostgreSQL
        stamps enqueued_at and next_attempt_at with the server's now instead
        of the rows' own."""

    async def claim(
        self,
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> Rows:
        """Move up to `limit` due, unexpired, pending rows to inflight under
        `token`, highest priority and oldest first, and return them.
        PostgreSQL judges due-ness, age and the lease's end by the server's
        clock (`now` decides nothing there)."""

    async def complete(self, completions: Sequence[Completion]) -> Applied:
        """Apply each completion if its row is still inflight under its token.
        Returns, per completion, whether it applied (False: stale lease).
        PostgreSQL moves a pending row's retry time (the caller's now plus a
        delay) onto the server's clock."""

    async def complete_and_claim(
        self,
        completions: Sequence[Completion],
        *,
        now: int,
        limit: int,
        lease_ms: int,
        max_age_ms: int,
        token: str,
        exclude: RouteFilter = NO_FILTER,
    ) -> tuple[Applied, Rows]:
        """`complete` then `claim`, in one transaction. On PostgreSQL `now`
        only translates retry times onto the server's clock."""

    async def recover_expired_leases(
        self, *, now: int, max_attempts: int, unknown_fate: UnknownFate = "resend"
    ) -> int:
        """Move inflight rows whose lease ran out where
        `_lifecycle.on_lease_expired` says: back to pending, or dead at the
        attempt cap or under ``unknown_fate="dead"``. Returns the rows moved.
        PostgreSQL judges expiry by the server's clock (`now` is ignored)."""

    async def expire_stale(self, *, now: int, max_age_ms: int) -> int:
        """Move pending rows older than max_age to dead ("expired"). PostgreSQL
        judges age by the server's clock (`now` is ignored)."""

    async def next_due_at(self, *, now: int, max_age_ms: int, exclude: RouteFilter = NO_FILTER) -> int | None:
        """The earliest next_attempt_at of a claimable-in-future pending row,
        on the caller's clock: PostgreSQL answers `now` plus how far in the
        server's future the row is due."""

    async def watch(self, wake: Callable[[], None]) -> NoReturn:
        """Call `wake` when another process may have added rows; runs until
        cancelled. A back end without cross-process notifications sleeps."""

    async def get(self, row_id: str) -> OutboxRow | None: ...

    async def get_by_client_id(self, client_message_id: str) -> OutboxRow | None: ...

    async def list(
        self,
        *,
        status: Status | None = None,
        limit: int,
        before: int | Cursor | None = None,
        after: int | Cursor | None = None,
        where: RowFilter = ...,
        now: int = 0,
        oldest_first: bool = False,
    ) -> Rows:
        """Rows in accept order (newest first unless `oldest_first`) matching
        `where`, between the cursors (`_reads.SqlReads.list`)."""

    async def count(self, *, where: RowFilter = ..., now: int = 0) -> int:
        """How many rows match `where`."""

    async def with_id_prefix(self, prefix: str, *, limit: int) -> Rows:
        """Rows whose id starts with `prefix`, in id order."""

    async def short_ids(self, row_ids: Sequence[str], *, minimum: int) -> dict[str, str]:
        """Each id's shortest prefix that no other row's id starts with."""

    async def counts(self) -> dict[str, int]: ...

    async def requeue(
        self, row_id: str, *, now: int, new_id: str, new_client_message_id: str, by: str
    ) -> OutboxRow:
        """Abort the row and insert its pending successor; return the successor."""

    async def drop(self, row_id: str, *, now: int, by: str) -> OutboxRow: ...

    async def requeue_many(
        self,
        row_ids: Sequence[str],
        *,
        now: int,
        new_ids: Sequence[tuple[str, str]],
        by: str,
        where: RowFilter = ...,
    ) -> Requeued:
        """Requeue the rows that still may be and still match `where`, in one transaction."""

    async def drop_many(self, row_ids: Sequence[str], *, now: int, by: str, where: RowFilter = ...) -> Rows:
        """Drop the rows that still may be and still match `where`, in one transaction."""

    async def prune(
        self, *, older_than_ms: int, now: int, statuses: frozenset[Status] = ..., limit: int = ...
    ) -> int:
        """Delete up to `limit` settled rows of `statuses` older than `older_than_ms`."""

    async def pause(self, route: str, *, now: int, by: str) -> bool:
        """Pause the route named `route`; False if it already was."""

    async def resume(self, route: str) -> bool:
        """Resume the route named `route`; False if it was not paused."""

    async def paused(self) -> dict[str, tuple[int, str]]:
        """Paused routes: name -> (paused_at, paused_by)."""

    async def aclose(self) -> None: ...
