"""The error vocabulary of trio-drain.

Every error the library raises on purpose derives from :class:`TrioDrainError`,
so a host application can catch the whole family with one clause. Foreign
exceptions (sqlite3, psycopg, wsproto) are translated at the boundary where
they occur and never reach callers raw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._model import AcceptOutcome


class TrioDrainError(Exception):
    """Base class of every error trio-drain raises on purpose."""


class InvalidRequest(TrioDrainError, ValueError):
    """A `SendRequest` (or another argument) failed validation.

    Nothing was written and no id was consumed.
    """


class ConfigError(TrioDrainError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class StoreError(TrioDrainError):
    """The outbox store failed (I/O error, lock timeout, full disk, ...)."""


class StoreClosed(StoreError):
    """The outbox was used after it was closed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (a transient condition)."""


class CorruptDatabase(StoreError):
    """The database file failed its integrity check or is not a database.

    The file was left untouched.
    """


class SchemaError(StoreError):
    """The database holds a schema this version cannot use (e.g. newer)."""


class AcceptConflict(TrioDrainError):
    """`accept_in` was given a request whose client_message_id is taken: by a
    different request, or by a dead or aborted row (a ``conflict`` of the
    idempotency table). Nothing was written, and the caller's transaction is
    as it was before the call.

    Attributes:
        outcome: the ``conflict`` outcome `Outbox.accept` answers for the same
            request, with its `reason`, `fingerprint_prefix` and
            `broker_message_id`.
    """

    def __init__(self, outcome: AcceptOutcome) -> None:
        super().__init__(
            f"client_message_id {outcome.client_message_id!r} is taken: {outcome.reason}"
            f" (stored fingerprint {outcome.fingerprint_prefix})"
        )
        self.outcome = outcome

    def __reduce__(self) -> tuple[type[AcceptConflict], tuple[AcceptOutcome]]:
        return (type(self), (self.outcome,))


class UnknownRow(TrioDrainError, LookupError):
    """No outbox row has the given id."""


class InvalidTransition(TrioDrainError):
    """The requested operation is not allowed from the row's current state."""


class BrokerError(TrioDrainError):
    """Base class of broker and transport errors."""


class BrokerUnavailable(BrokerError):
    """The broker connection is not open; nothing was sent."""


class HandshakeError(BrokerError):
    """The broker refused our hello or did not answer it in time.

    Attributes:
        refused: the broker said no (an `error` frame): retrying as we are
            will not help. False when it merely did not answer in time.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
