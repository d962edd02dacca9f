"""`trio-drain keygen`: make an ed25519 key pair, the secret written so that
only its owner can read it and never over an existing key."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .._brokers._identity import generate_secret_key, public_key_hex
from .._errors import TrioDrainError
from ._boundary import UsageError
from ._output import print_json


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keygen` and its option to the command line.

    Args:
        commands: The top-level parser's subcommands.
    """
    keygen = commands.add_parser("keygen", help="make an ed25519 key pair")
    keygen.add_argument("--out", help="write the secret key here (mode 0600) and print the public key")


def cmd_keygen(args: argparse.Namespace) -> int:
    """Print a new key pair as JSON, or write its secret to `args.out`.

    Synchronous: it runs outside Trio.

    Args:
        args: The parsed arguments of `keygen`.

    Returns:
        0.

    Raises:
        UsageError: `args.out` exists.
        TrioDrainError: `args.out` cannot be written.
    """
    secret = generate_secret_key()
    pubkey = public_key_hex(secret)
    if args.out:
        path = Path(args.out)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{path} exists; refusing to overwrite a key") from None
        except OSError as exc:
            raise TrioDrainError(f"cannot write {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        print(pubkey)
    else:
        print_json({"public_key": pubkey, "secret_key": secret})
    return 0
