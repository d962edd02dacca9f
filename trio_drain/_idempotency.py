"""The idempotency table of accept (SPEC section 3), as a pure function."""

from __future__ import annotations

from ._model import AcceptOutcome, OutboxRow, OutcomeKind, Status

_CODES = {
    OutcomeKind.ACCEPTED_PENDING: 202,
    OutcomeKind.ACCEPTED_INFLIGHT: 202,
    OutcomeKind.ACCEPTED_DONE: 200,
    OutcomeKind.CONFLICT: 409,
}


def decide_accept(
    existing: OutboxRow | None, *, client_message_id: str, fingerprint: bytes, new_row_id: str | None = None
) -> AcceptOutcome:
    """The idempotency table of section 3 of the spec.

    `existing` is the row already holding `client_message_id`, if any. When
    it is None the caller inserts a new row (`new_row_id`) and the outcome is
    `accepted_pending` with `inserted=True`.
    """
    if existing is None:  # the common case, built directly: this runs once per accepted row
        return AcceptOutcome(
            kind=OutcomeKind.ACCEPTED_PENDING,
            code=202,
            client_message_id=client_message_id,
            row_id=new_row_id,
            inserted=True,
        )
    common = {"row_id": existing.id, "broker_message_id": existing.broker_message_id}
    if existing.request_fingerprint != fingerprint:
        return _outcome(
            OutcomeKind.CONFLICT,
            client_message_id,
            reason=f"outbox_{existing.status.value}_fingerprint_mismatch",
            fingerprint_prefix=existing.request_fingerprint[:8].hex(),
            **common,
        )
    if existing.status is Status.PENDING:
        return _outcome(OutcomeKind.ACCEPTED_PENDING, client_message_id, **common)
    if existing.status is Status.INFLIGHT:
        return _outcome(OutcomeKind.ACCEPTED_INFLIGHT, client_message_id, **common)
    if existing.status is Status.DONE:
        return _outcome(OutcomeKind.ACCEPTED_DONE, client_message_id, **common)
    return _outcome(
        OutcomeKind.CONFLICT,
        client_message_id,
        reason=f"outbox_{existing.status.value}_fingerprint_match",
        fingerprint_prefix=existing.request_fingerprint[:8].hex(),
        **common,
    )


def _outcome(kind: OutcomeKind, client_message_id: str, **fields: object) -> AcceptOutcome:
    return AcceptOutcome(
        kind=kind,
        code=_CODES[kind],
        client_message_id=client_message_id,
        **fields,  # type: ignore[arg-type]
    )
