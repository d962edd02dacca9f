"""`trio-drain broker serve`: the reference broker on a port until SIGINT or
SIGTERM, with the fault knobs tests and demos use."""

from __future__ import annotations

import argparse
import signal

import trio

from .._errors import TrioDrainError
from .._reference_broker import Faults, RateLimit, load_members, serve_broker
from ._args import port, positive_int, rate, seconds
from ._boundary import leaves
from ._logging import log


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `broker serve` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    broker = commands.add_parser("broker", help="the reference broker")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    serve = broker_sub.add_parser("serve", help="serve the reference broker")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=port, default=8765, help="0 picks a free port")
    serve.add_argument("--db", help="SQLite file keeping accepted ids (dedupe survives restarts)")
    who = serve.add_mutually_exclusive_group(required=True)
    who.add_argument("--members", help='JSON file: {"meshId": {"memberId": "pubkey hex"}}')
    who.add_argument("--open", action="store_true", help="accept any correctly signed hello")
    serve.add_argument(
        "--max-payload",
        type=positive_int,
        default=1024 * 1024,
        help="largest frame accepted, in bytes (default: 1 MiB)",
    )
    serve.add_argument("--ack-delay", type=seconds, default=0.0, help="fault: seconds before each ack")
    serve.add_argument(
        "--ack-delay-schedule",
        metavar="MS@S,...",
        help="fault: an ack delay that changes while it runs, as 1@0,20@5,1@10 (1 ms from the start,"
        " 20 ms from 5 s, 1 ms from 10 s); replaces --ack-delay",
    )
    serve.add_argument(
        "--capacity",
        type=positive_int,
        metavar="K",
        help="fault: answer a send at once with a transient overloaded error while K sends of its"
        " connection wait for their ack",
    )
    serve.add_argument("--drop-ack-rate", type=rate, default=0.0, help="fault: share of acks never sent")
    serve.add_argument(
        "--transient-error-rate", type=rate, default=0.0, help="fault: share of transient errors"
    )
    serve.add_argument(
        "--disconnect-every", type=int, default=0, help="fault: drop a connection every N sends"
    )
    serve.add_argument("--receipts", help="append every send received to this file (counts transmissions)")
    serve.add_argument(
        "--rate-limit",
        metavar="BURST/PER_MIN",
        help="refuse a member's sends past a burst and a rate, as 10/60 (the real broker's)",
    )
    serve.add_argument(
        "--compat",
        choices=["claudemesh"],
        help="answer like the seed's real broker: its ack shape and texts, no dedupe",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=65_536,
        help="with --compat: most characters of ciphertext, nonce and target (65536)",
    )


async def cmd_broker_serve(args: argparse.Namespace) -> int:
    """Serve the reference broker until SIGINT or SIGTERM.

    It stops gracefully on a signal itself, so it is not wrapped in
    `interruptible`.

    Args:
        args: The parsed arguments of `broker serve`.

    Returns:
        0 after a signal.

    Raises:
        TrioDrainError: The address cannot be listened on.
    """
    members = None if args.open else load_members(args.members)
    faults = Faults(
        ack_delay=args.ack_delay,
        ack_delay_schedule=args.ack_delay_schedule,
        capacity=args.capacity or 0,
        drop_ack_rate=args.drop_ack_rate,
        transient_error_rate=args.transient_error_rate,
        disconnect_every=args.disconnect_every,
        rate_limit=None if args.rate_limit is None else RateLimit.parse(args.rate_limit),
    )
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_broker(
                    host=args.host,
                    port=args.port,
                    db=args.db,
                    members=members,
                    open_mode=args.open,
                    max_payload=args.max_payload,
                    faults=faults,
                    receipts=args.receipts,
                    compat=args.compat,
                    max_message_bytes=args.max_message_bytes,
                    task_status=task_status,
                )
            )
            print(f"reference broker listening on {server.url}", flush=True)
            await _wait_for_signal()
            nursery.cancel_scope.cancel()
    except* OSError as group:  # a port in use, a host that does not resolve: inside the nursery
        exc = leaves(group)[0]
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TrioDrainError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    return 0


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            return
