"""The reference broker's counters: a mutable tally it keeps, a frozen snapshot it hands out."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class BrokerStatistics:
    """A snapshot of a reference broker's counters (since it started).

    Attributes:
        connections: WebSocket connections opened to it.
        hellos_rejected: hellos it refused (or, in compat mode, left unanswered).
        accepted: sends it accepted (some of their acks may have been dropped:
            `dropped_acks`).
        duplicates: resends it recognised and acked with the first message id.
        rejected: sends it refused for good (invalid, too large, a reused key).
        transient_errors: transient error acks it injected (`Faults`).
        dropped_acks: accepted sends whose ack it dropped (`Faults`).
        disconnects: connections it closed on purpose (`Faults`).
        rate_limited: sends it refused for the member's rate.
        overloaded: sends it refused at once because as many sends of
            their connection as its capacity waited for their ack (`Faults`).
        redelivered: sends accepted again under a new message id (compat
            mode: no dedupe).
        unanswered: send frames it could not handle and so never answered
            (compat mode).
    """

    connections: int
    hellos_rejected: int
    accepted: int
    duplicates: int
    rejected: int
    transient_errors: int
    dropped_acks: int
    disconnects: int
    rate_limited: int
    overloaded: int
    redelivered: int
    unanswered: int


@attrs.define
class Counters:
    """The live tally behind `BrokerStatistics`, bumped on the hot path.

    Plain slotted attributes, so a bump costs one attribute store.
    """

    connections: int = 0
    hellos_rejected: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    transient_errors: int = 0
    dropped_acks: int = 0
    disconnects: int = 0
    rate_limited: int = 0
    overloaded: int = 0
    redelivered: int = 0
    unanswered: int = 0

    def snapshot(self) -> BrokerStatistics:
        """The counters as they are now, frozen."""
        # The snapshot's fields have no defaults: a counter added here but
        # not there (or the reverse) fails the first call, not silently.
        return BrokerStatistics(**attrs.asdict(self))
