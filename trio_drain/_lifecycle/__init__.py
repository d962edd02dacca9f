"""The row state machine, as pure functions with no I/O.

Every decision about where a row goes next is made here, from the row and
the event, and returned as a value. Stores persist these decisions (with a
fenced lease token on every transition out of ``inflight``); the worker
drives them; transports deliver. Nothing in this module knows about SQL,
sockets or the clock: times are passed in as integer milliseconds.

    (none)   --accept-------------------------> pending
    pending  --claim (due, not expired,-------> inflight   attempts + 1, lease
              first of its lane, route not paused)
    inflight --broker ack---------------------> done
    inflight --transient error----------------> pending    backoff(attempts)
    inflight --transient error at cap---------> dead       "max_attempts: <error>"
    inflight --permanent error----------------> dead
    inflight --route unavailable--------------> pending    attempt given back
    inflight --rate limited-------------------> pending    attempt given back, route paced
    inflight --no answer (fate unknown)-------> pending    as a transient error, or dead
                                                           "unknown_fate: ..." if so configured
    inflight --no broker for the mesh---------> dead       "no_broker_for_mesh:<mesh>"
    inflight --lease expired------------------> pending    (store sweep; dead at the cap, or
                                                           "unknown_fate: ..." if so configured)
    inflight --cancelled before the send------> pending    attempt given back
    pending  --older than max_age-------------> dead       "expired" (store sweep)
    pending, inflight, dead --requeue---------> aborted    + a new pending row
    pending, dead --drop----------------------> aborted
    done     --retention passed---------------> (deleted)  (store sweep)

The transitions are in `_transitions`; the rules stores apply to many rows
at once (claims, sweeps) are data in `_rules`.
"""

from ._rules import ACTIVE as ACTIVE
from ._rules import AT_ATTEMPT_CAP as AT_ATTEMPT_CAP
from ._rules import CLAIMABLE as CLAIMABLE
from ._rules import LANE_HOLD_RAN_OUT as LANE_HOLD_RAN_OUT
from ._rules import LEASE_RAN_OUT as LEASE_RAN_OUT
from ._rules import PAST_MAX_AGE as PAST_MAX_AGE
from ._rules import WAITING as WAITING
from ._rules import Bound as Bound
from ._rules import Compare as Compare
from ._rules import Either as Either
from ._rules import FirstInLane as FirstInLane
from ._rules import IsNull as IsNull
from ._rules import RouteNotPaused as RouteNotPaused
from ._rules import Rule as Rule
from ._rules import Table as Table
from ._rules import Term as Term
from ._rules import World as World
from ._rules import bound_value as bound_value
from ._rules import holds as holds
from ._rules import holds_lane as holds_lane
from ._rules import is_claimable as is_claimable
from ._rules import is_expired as is_expired
from ._rules import lease_is_expired as lease_is_expired
from ._rules import route_name as route_name
from ._transitions import DROPPABLE as DROPPABLE
from ._transitions import EXPIRED as EXPIRED
from ._transitions import LEASE_EXPIRED as LEASE_EXPIRED
from ._transitions import LEASE_EXPIRED_AT_CAP as LEASE_EXPIRED_AT_CAP
from ._transitions import LEAVES_LANE as LEAVES_LANE
from ._transitions import REQUEUEABLE as REQUEUEABLE
from ._transitions import ROUTE_UNAVAILABLE as ROUTE_UNAVAILABLE
from ._transitions import UNKNOWN_FATE as UNKNOWN_FATE
from ._transitions import UNKNOWN_FATE_LEASE as UNKNOWN_FATE_LEASE
from ._transitions import WORKER_STOPPED as WORKER_STOPPED
from ._transitions import WORKER_STOPPED_AT_CAP as WORKER_STOPPED_AT_CAP
from ._transitions import Completion as Completion
from ._transitions import RetryPolicy as RetryPolicy
from ._transitions import UnknownFate as UnknownFate
from ._transitions import backoff_ms as backoff_ms
from ._transitions import dropped as dropped
from ._transitions import on_ack as on_ack
from ._transitions import on_error as on_error
from ._transitions import on_lease_expired as on_lease_expired
from ._transitions import on_no_answer as on_no_answer
from ._transitions import on_no_broker as on_no_broker
from ._transitions import on_rate_limited as on_rate_limited
from ._transitions import on_released as on_released
from ._transitions import on_route_unavailable as on_route_unavailable
from ._transitions import releases_lane as releases_lane
from ._transitions import requeued as requeued
