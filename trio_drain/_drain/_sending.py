"""Sending: each claimed row is routed, then sent, held for slow start, or settled at once.

A `PipelinedBroker` (such as `WebSocketBroker`) queues the frame at once
and calls back with the ack, so a row costs no task, no cancel scope and no
event; the worker's sweep fails the acks that come too late. A broker with
only `send` gets a task per row, which waits for the answer within the ack
timeout. Either way the answer goes to `Outcomes.on_result`.
"""

from __future__ import annotations

import functools
import logging
import math

import trio

from .. import _lifecycle
from .._brokers._registry import BrokerRegistry, NoBroker, Ready, Unavailable
from .._brokers._wire import OutgoingMessage, SendResult, outgoing_message, unsendable
from .._config import DrainConfig
from .._display import Throttle, bounded, quieted, visible
from .._errors import BrokerUnavailable
from .._lifecycle import RetryPolicy
from .._outbox import Outbox
from ._delivery import ACK_TIMEOUT, Delivery, Settled
from ._gates import Gate, Gates
from ._outcomes import Outcomes
from ._statistics import Counters

log = logging.getLogger("trio_drain.worker")


class Sender:
    """Puts the worker's deliveries on the wire, each through its route's gate."""

    def __init__(
        self,
        *,
        registry: BrokerRegistry,
        outbox: Outbox,
        config: DrainConfig,
        policy: RetryPolicy,
        gates: Gates,
        out: set[Delivery],
        outcomes: Outcomes,
        counters: Counters,
        throttle: Throttle,
    ) -> None:
        self._registry = registry
        self._outbox = outbox
        self._config = config
        self._policy = policy
        self._gates = gates
        self._out = out  # the worker's table of rows claimed and not yet settled
        # The gates' table itself, a plain dict: a row's gate is one dict look-up.
        self._by_route = gates.by_route
        self._outcomes = outcomes
        # Bound once, not once per row: every pipelined send is handed it.
        self._on_result = outcomes.on_result
        self._counters = counters
        self._throttle = throttle

    def launch(self, deliveries: list[Delivery], tasks: trio.Nursery) -> None:
        """Start every delivery of a claim; `tasks` runs the sends that need a task."""
        deadline = trio.current_time() + self._config.ack_timeout
        for delivery in deliveries:
            self._start(delivery, tasks, deadline)

    def release_held(self, gate: Gate, tasks: trio.Nursery) -> None:
        """Send rows slow start held, as far as it now allows."""
        now = trio.current_time()
        deadline = now + self._config.ack_timeout
        while gate.held and gate.pacer.may_send(gate.pacer.unanswered, now):
            delivery = gate.held.popleft()
            if delivery in self._out:
                self._send(delivery, tasks, deadline, now)

    def _start(self, delivery: Delivery, tasks: trio.Nursery, deadline: float) -> None:
        """Route one claimed row and send it (or hold it, or settle it at once)."""
        row = delivery.row
        route = self._registry.resolve(row)
        if isinstance(route, NoBroker):
            quiet = self._throttle(("no broker", row.mesh))
            if quiet is not None:
                log.warning(
                    "no broker for mesh %s: row %s is dead%s", visible(str(row.mesh)), row.id, quieted(quiet)
                )
            self._outcomes.settle(
                delivery, _lifecycle.on_no_broker(row), Settled.RESULT, "mesh:" + str(row.mesh)
            )
            return
        if isinstance(route, Unavailable):
            self._outcomes.give_back(delivery, route)
            return
        problem = unsendable(row)
        if problem is not None:
            log.warning("row %s can never be sent: %s", row.id, problem)
            completion = _lifecycle.on_error(
                row, error=problem, permanent=True, now=self._outbox.clock(), policy=self._policy, jitter=0.0
            )
            self._outcomes.settle(delivery, completion, Settled.RESULT, route.name)
            return
        gate = self._by_route.get((route.kind, route.key)) or self._gates.add(route)
        delivery.gate, delivery.route, delivery.route_name = gate, route, route.name
        now = deadline - self._config.ack_timeout  # when this batch was launched
        pacer = gate.pacer
        # The common case first, inline: an unpaced route past slow start.
        if not gate.held and (
            (pacer.rate is None and pacer.cap is None) or pacer.may_send(pacer.unanswered, now)
        ):
            self._send(delivery, tasks, deadline, now)
        elif gate.pacer.paced:  # claimed just before its route was paced: its turn comes unclaimed
            self._outcomes.pace_back(delivery, gate, "route_paced")
        else:  # slow start: it goes as answers come back
            delivery.held_since = now
            gate.held.append(delivery)

    def _send(self, delivery: Delivery, tasks: trio.Nursery, deadline: float, now: float) -> None:
        """Hand a routed row to its broker. It counts against its route's
        pacing from here, whether it leaves now or from a task."""
        route, gate = delivery.route, delivery.gate
        assert route is not None and gate is not None
        delivery.sent_at, delivery.held_since = now, math.inf
        delivery.counted = True
        gate.pacer.unanswered += 1
        gate.pacer.took(now)
        message = outgoing_message(delivery.row)
        start_send = getattr(route.broker, "start_send", None)
        if start_send is None:  # a plain Broker: a task waits for its answer
            tasks.start_soon(self._send_in_task, delivery, route, message)
            return
        delivery.sent = True
        delivery.deadline = deadline
        try:
            delivery.handle = start_send(message, functools.partial(self._on_result, delivery))
        except BrokerUnavailable:  # closed since we resolved the route: nothing left
            self._unsent(delivery)
            return
        self._counters.count("sent", route.name)

    def _unsent(self, delivery: Delivery) -> None:
        """The socket closed before the frame could leave: back it goes."""
        delivery.sent = False
        self._outcomes.give_back(delivery, self._registry.unavailable_route(delivery.row))

    async def _send_in_task(self, delivery: Delivery, route: Ready, message: OutgoingMessage) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # stopping already: nothing leaves
        if delivery not in self._out:  # handed back (stop(), or held too long) before this task ran
            return
        delivery.sent = True
        self._counters.count("sent", route.name)
        result = ACK_TIMEOUT
        try:
            with trio.move_on_after(self._config.ack_timeout):
                result = await route.broker.send(message)
        except BrokerUnavailable:  # nothing left: the socket closed under us
            self._unsent(delivery)
            return
        except Exception as exc:  # a broker bug must not kill the worker
            log.exception("broker %s raised while sending %s", route.name, message.client_message_id)
            result = SendResult.no_answer(bounded(f"send_failed: {type(exc).__name__}: {exc}"))
        self._outcomes.on_result(delivery, result)
