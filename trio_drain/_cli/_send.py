"""`trio-drain send`: accept one message into an outbox and say what became
of it (accepted, a duplicate, or refused)."""

from __future__ import annotations

import argparse
import os

from .._model import SendRequest
from .._outbox import open_outbox
from ._boundary import EXIT_RUNTIME, UsageError
from ._output import emit


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `send` and its options to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    send = commands.add_parser("send", help="accept one message into an outbox")
    send.add_argument("--db", required=True)
    send.add_argument("--mesh", required=True)
    send.add_argument("--to", required=True, help="target spec: *, #topic, @group or a 64-hex pubkey")
    send.add_argument("--priority", default="next", choices=["now", "next", "low"])
    send.add_argument("--client-id")
    send.add_argument("--json", action="store_true")
    send.add_argument("message")


async def cmd_send(args: argparse.Namespace) -> int:
    """Accept `args.message` into `args.db`.

    Args:
        args: The parsed arguments of `send`.

    Returns:
        0 if the outbox accepted the message (or already had it), else 1.
    """
    for name in ("mesh", "to", "client_id"):
        _utf8_argument(name, getattr(args, name))
    # The message is bytes: as given, even when it is not UTF-8 (the
    # interpreter hands such arguments over with surrogate escapes).
    payload = os.fsencode(args.message)
    async with open_outbox(args.db) as outbox:
        outcome = await outbox.accept(
            SendRequest(
                mesh=args.mesh,
                target_spec=args.to,
                payload=payload,
                priority=args.priority,
                client_message_id=args.client_id,
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


def _utf8_argument(name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        value.encode()
    except UnicodeEncodeError:
        raise UsageError(f"--{name.replace('_', '-')} is not valid UTF-8 text") from None
