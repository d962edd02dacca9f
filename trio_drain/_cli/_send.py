"""`trio-drain send`: accept one message into an outbox and say what became
of it (accepted, a duplicate, or refused).

The message is the argument, a file (`--file PATH`) or standard input
(`-`): a message of a megabyte cannot go through the command line (Linux
takes at most 128 KiB in one argument).
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from .._model import SendRequest
from .._outbox import open_outbox
from .._validate import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD
from ._args import add_db, add_json, positive_int, text_argument
from ._boundary import EXIT_RUNTIME, UsageError
from ._output import emit


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `send` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    send = commands.add_parser(
        "send",
        help="accept one message into an outbox",
        description="Accept one message into an outbox (the drain delivers it). The message is the"
        " MESSAGE argument, the file --file names, or standard input (-).",
    )
    add_db(send)
    send.add_argument("--mesh", required=True, metavar="SLUG", help="the mesh the message goes through")
    send.add_argument(
        "--to", required=True, metavar="TARGET", help="target spec: *, #topic, @group or a 64-hex pubkey"
    )
    send.add_argument(
        "--priority", default="next", choices=["now", "next", "low"], help="now, next or low (default: next)"
    )
    send.add_argument(
        "--client-id",
        metavar="ID",
        help="the message's client_message_id: sending again with the same id is safe (default: a fresh one)",
    )
    send.add_argument(
        "--ordering-key",
        metavar="KEY",
        help="the ordering lane: messages with one key go out one at a time, in the order accepted",
    )
    send.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="N",
        help="the broker's limit on a send (ciphertext, nonce and target, in characters); a message"
        f" that could never fit is refused now (default {DEFAULT_MAX_MESSAGE_BYTES:,}, the real"
        " broker's)",
    )
    add_json(send)
    source = send.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "message", nargs="?", metavar="MESSAGE", help="the message itself; - reads it from standard input"
    )
    source.add_argument(
        "--file", metavar="PATH", help="read the message from this file (- for standard input)"
    )


async def cmd_send(args: argparse.Namespace) -> int:
    """Accept the message into `args.db`.

    Args:
        args: The parsed arguments of `send`.

    Returns:
        0 if the outbox accepted the message (or already had it), else 1.
    """
    for name in ("mesh", "to", "client_id", "ordering_key"):
        text_argument(f"--{name.replace('_', '-')}", getattr(args, name))
    payload = await _message(args)
    async with open_outbox(args.db, max_message_bytes=args.max_message_bytes) as outbox:
        outcome = await outbox.accept(
            SendRequest(
                mesh=args.mesh,
                target_spec=args.to,
                payload=payload,
                priority=args.priority,
                client_message_id=args.client_id,
                ordering_key=args.ordering_key,
            )
        )
    fields = {
        "kind": outcome.kind.value,
        "code": outcome.code,
        "client_message_id": outcome.client_message_id,
        "row_id": outcome.row_id,
        "reason": outcome.reason,
        "broker_message_id": outcome.broker_message_id,
    }
    emit(
        args,
        fields,
        f"{outcome.kind.value} ({outcome.code}) {outcome.client_message_id}"
        + (f": {outcome.reason}" if outcome.reason else ""),
    )
    return 0 if outcome.accepted else EXIT_RUNTIME


async def _message(args: argparse.Namespace) -> bytes:
    """The message's bytes, as given: from the argument (even when it is not
    UTF-8: the interpreter hands such arguments over with surrogate
    escapes), a file or standard input; at most one byte more than an outbox
    takes, so that a huge file is refused without being read whole."""
    source = args.file if args.file is not None else args.message
    if args.file is None and source != "-":
        return os.fsencode(source)
    most = DEFAULT_MAX_PAYLOAD + 1
    if source == "-":
        if sys.stdin is None:
            raise UsageError("no standard input to read the message from")
        stdin = sys.stdin.buffer
        return await trio.to_thread.run_sync(stdin.read, most, abandon_on_cancel=True)
    try:
        async with await trio.open_file(source, "rb") as f:
            return await f.read(most)
    except OSError as exc:
        raise UsageError(f"cannot read the message from {source}: {exc.strerror or exc}") from None
