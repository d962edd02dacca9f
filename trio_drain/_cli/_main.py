"""The `trio-drain` command line.

Every error a user can cause ends in one line on stderr and exit status 2
(usage, config) or 1 (runtime); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from .._brokers._identity import MeshIdentity, generate_secret_key, public_key_hex, signing_key
from .._brokers._registry import BrokerRegistry
from .._brokers._websocket import WebSocketBroker, check_broker_url
from .._config import DrainConfig
from .._display import bounded, visible
from .._drain._worker import DrainWorker
from .._errors import ConfigError, TrioDrainError
from .._model import OutboxRow, SendRequest, Status
from .._outbox import Outbox, open_outbox, parse_target
from .._reference_broker._server import Faults, RateLimit, load_members, serve_broker
from .._version import __version__

log = logging.getLogger("trio_drain.cli")
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(TrioDrainError):
    """A command-line or config mistake (exit status 2)."""


# -- output helpers ---------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=None, sort_keys=True, default=str) + "\n")


def _emit(args: argparse.Namespace, value: Any, text: str) -> None:
    """Print `value` as JSON under --json, else one line of text (made inert:
    it may quote the outbox or a request)."""
    if args.json:
        _print_json(value)
    else:
        print(visible(text))


def _rows_table(rows: Sequence[OutboxRow]) -> None:
    from rich.table import Table
    from rich.text import Text

    def cell(value: str | None, limit: int = 200) -> Text:
        # Text is never parsed as markup; bounded() makes controls visible.
        return Text("-" if value is None else bounded(value, limit))

    table = Table("id", "client_message_id", "status", "attempts", "mesh", "target", "last_error")
    for r in rows:
        table.add_row(
            cell(r.id),
            cell(r.client_message_id),
            cell(r.status.value),
            cell(str(r.attempts)),
            cell(r.mesh),
            cell(r.target_spec),
            cell(r.last_error, 60),
        )
    _console().print(table)


#: `outbox inspect` shows this much of a payload unless --full.
PAYLOAD_PREVIEW = 1024


def _payload_lines(payload: bytes, full: bool) -> str:
    """A payload for a person: text made inert, or hex if it is not UTF-8;
    cut after PAYLOAD_PREVIEW bytes unless `full`."""
    shown = payload if full else payload[:PAYLOAD_PREVIEW]
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        text = f"<{len(payload):,} bytes, not UTF-8> {shown.hex()}"
    else:  # a cut may split a character: drop its first bytes
        text = visible(shown.decode("utf-8", errors="ignore"))
    if len(shown) < len(payload):
        text += f" … ({len(payload):,} bytes in all; --full shows them)"
    return text


class _TextFormatter(logging.Formatter):
    """Log lines with every message made inert: a broker's words, a row's
    error or a client id may quote terminal escapes (JSON logs escape them
    by themselves)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(visible(line) for line in super().formatException(ei).splitlines())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("trio_drain")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- opening things ------------------------------------------------------------


def _existing_db(db: str) -> str:
    """Commands that inspect an outbox must not create one by mistake."""
    kind, location = parse_target(db)
    if kind == "sqlite" and not Path(location).exists():
        raise UsageError(f"no outbox database at {location}")
    return db


_MESH_KEYS = frozenset({"slug", "mesh_id", "member_id", "broker_url", "secret_key", "secret_key_file"})


def _load_config(path: str) -> tuple[DrainConfig, list[dict[str, Any]]]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"drain", "mesh"})
    if unknown:
        raise ConfigError(f"config {path}: unknown section(s) {', '.join(unknown)}")
    drain = data.get("drain", {})
    if not isinstance(drain, dict):
        raise ConfigError("config: [drain] must be a table")
    config = DrainConfig.from_mapping(drain)
    meshes = data.get("mesh", [])
    if not isinstance(meshes, list) or not meshes:
        raise ConfigError(f"config {path}: at least one [[mesh]] is required")
    base = Path(path).parent
    slugs: set[str] = set()
    for m in meshes:
        if not isinstance(m, dict):
            raise ConfigError("config: each [[mesh]] must be a table")
        unknown = sorted(set(m) - _MESH_KEYS)
        if unknown:
            raise ConfigError(
                f"config: [[mesh]] {m.get('slug', '?')}: unknown key(s) {', '.join(map(str, unknown))}"
            )
        missing = [
            k
            for k in ("slug", "mesh_id", "member_id", "broker_url")
            if not isinstance(m.get(k), str) or not m[k]
        ]
        if missing:
            raise ConfigError(f"config: [[mesh]] {m.get('slug', '?')} is missing {', '.join(missing)}")
        if m["slug"] in slugs:
            raise ConfigError(f"config: two [[mesh]] tables have the slug {m['slug']}")
        slugs.add(m["slug"])
        try:
            check_broker_url(m["broker_url"])
        except ConfigError as exc:
            raise ConfigError(f"config: [[mesh]] {m['slug']}: {exc}") from None
        if "secret_key_file" in m:
            key_path = base / str(m["secret_key_file"])
            try:
                m["secret_key"] = key_path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"config: cannot read secret_key_file {key_path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"config: secret_key_file {key_path} is not text") from None
        if "secret_key" not in m:
            raise ConfigError(f"config: [[mesh]] {m['slug']} needs secret_key or secret_key_file")
        signing_key(str(m["secret_key"]), what=f"secret key of mesh {m['slug']}")
    return config, meshes


class _Signals:
    """SIGINT and SIGTERM for the whole of `run`: the first asks for a
    graceful stop, a second exits at once (rows still in flight come back
    through their lease)."""

    def __init__(self, shutdown_timeout: float) -> None:
        self.received = trio.Event()
        self.name = ""
        self.shutdown_timeout = shutdown_timeout

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if not self.received.is_set():
                    self.name = signal.Signals(signum).name
                    self.received.set()
                    self._watchdog()
                    continue
                sys.stderr.write(
                    "trio-drain: interrupted again; exiting at once"
                    " (rows in flight come back when their lease ends)\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)

    def _watchdog(self) -> None:
        """Whatever a broker, a disk or a database server does while we
        stop, the process is gone shortly after `shutdown_timeout`: a
        thread, since the Trio loop is what could be stuck."""

        def expire() -> None:
            sys.stderr.write(
                f"trio-drain: not stopped {self.shutdown_timeout + _WATCHDOG_GRACE:g}s after the signal;"
                " exiting (rows in flight come back when their lease ends)\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_RUNTIME)

        timer = threading.Timer(self.shutdown_timeout + _WATCHDOG_GRACE, expire)
        timer.daemon = True
        timer.start()


#: How long past `shutdown_timeout` the watchdog lets a stopping `run` live.
_WATCHDOG_GRACE = 2.0


# -- commands --------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace) -> int:
    config, meshes = _load_config(args.config)
    signals = _Signals(config.shutdown_timeout)
    async with trio.open_nursery() as outer:
        await outer.start(signals.watch)  # to the end: a second signal always exits at once
        async with open_outbox(_existing_db(args.db)) as outbox:
            stopped = await _drain_until_signal(outbox, config, meshes, signals)
            if stopped:
                log.warning("stopped; outbox now %s", await outbox.counts())
        outer.cancel_scope.cancel()
    if not stopped:
        sys.stderr.write("trio-drain: interrupted before draining began\n")
        return EXIT_INTERRUPTED
    return 0


async def _drain_until_signal(
    outbox: Outbox,
    config: DrainConfig,
    meshes: list[dict[str, Any]],
    signals: _Signals,
) -> bool:
    """Run the brokers and the worker until a signal; stop within
    `shutdown_timeout`. Returns False if the signal came before the worker
    started."""
    async with trio.open_nursery() as nursery:
        registry = BrokerRegistry()
        worker = DrainWorker(outbox, registry, config)
        worker_done = trio.Event()

        async def run_worker(*, task_status: trio.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            worker_done.set()

        async def connect(m: dict[str, Any]) -> None:
            """One broker's first attempt: refuse to start only if retrying
            cannot mend it; an outage is waited out."""
            identity = MeshIdentity(
                mesh_id=m["mesh_id"], member_id=m["member_id"], secret_key=m["secret_key"]
            )
            broker = WebSocketBroker(m["broker_url"], identity)
            await nursery.start(broker.run)
            if broker.fatal_error is not None:
                raise TrioDrainError(
                    f"cannot start: the broker of mesh {m['slug']} at {m['broker_url']}: {broker.fatal_error}"
                )
            if not broker.is_open():
                log.warning(
                    "the broker of mesh %s at %s is not reachable (%s); draining the other routes"
                    " and reconnecting with backoff",
                    m["slug"],
                    m["broker_url"],
                    broker.last_error,
                )
            registry.set_mesh(m["slug"], broker)

        async def start() -> None:
            # Every broker's first attempt at once: one that hangs until its
            # connect timeout delays the start by that much, not by the sum.
            async with trio.open_nursery() as attempts:
                for m in meshes:
                    attempts.start_soon(connect, m)
            await nursery.start(run_worker)
            log.warning("draining %s through %d mesh broker(s)", outbox.description, len(meshes))

        with trio.CancelScope() as starting:
            nursery.start_soon(_cancel_on, signals.received, starting)
            await start()
        if starting.cancelled_caught:
            nursery.cancel_scope.cancel()
            return False
        await signals.received.wait()
        log.warning(
            "received %s; stopping within %gs (again to exit at once)", signals.name, config.shutdown_timeout
        )
        # Graceful: claim nothing more, wait (bounded) for the answers to what
        # is out; whatever is still unanswered then goes back to pending.
        worker.stop()
        with trio.move_on_after(max(config.shutdown_timeout - _HAND_BACK_RESERVE, 0)):
            await worker_done.wait()
        nursery.cancel_scope.cancel()
    return True


#: Of `shutdown_timeout`, what is kept for handing back the rows still out.
_HAND_BACK_RESERVE = 0.5


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def cmd_send(args: argparse.Namespace) -> int:
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
    _emit(
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


async def cmd_outbox(args: argparse.Namespace) -> int:
    async with open_outbox(_existing_db(args.db)) as outbox:
        status: int = await _OUTBOX_ACTIONS[args.action](outbox, args)
        return status


async def _find(outbox: Outbox, ident: str) -> OutboxRow:
    row = await outbox.get(ident) or await outbox.get_by_client_id(ident)
    if row is None:
        raise TrioDrainError(f"no outbox row with id or client_message_id {ident!r}")
    return row


async def _outbox_list(outbox: Outbox, args: argparse.Namespace) -> int:
    rows = await outbox.list(args.status, limit=args.limit)
    if args.json:
        _print_json([r.to_dict() for r in rows])
    else:
        _rows_table(rows)
    return 0


async def _outbox_inspect(outbox: Outbox, args: argparse.Namespace) -> int:
    row = await _find(outbox, args.id)
    if args.json:
        _print_json(row.to_dict())
        return 0
    for key, value in row.to_dict().items():
        if key == "payload":
            print(f"{key:>22}: {_payload_lines(row.payload, args.full)}")
        elif key != "payload_hex":
            print(f"{key:>22}: {'-' if value is None else visible(str(value))}")
    return 0


async def _outbox_requeue(outbox: Outbox, args: argparse.Namespace) -> int:
    successor = await outbox.requeue((await _find(outbox, args.id)).id)
    _emit(
        args,
        successor.to_dict(),
        f"requeued as {successor.id} (client_message_id {successor.client_message_id})",
    )
    return 0


async def _outbox_drop(outbox: Outbox, args: argparse.Namespace) -> int:
    row = await outbox.drop((await _find(outbox, args.id)).id)
    _emit(args, row.to_dict(), f"dropped {row.id}")
    return 0


async def _outbox_prune(outbox: Outbox, args: argparse.Namespace) -> int:
    deleted = await outbox.prune(args.older_than)
    _emit(args, {"deleted": deleted}, f"deleted {deleted} done row(s)")
    return 0


async def _outbox_stats(outbox: Outbox, args: argparse.Namespace) -> int:
    counts = await outbox.counts()
    if args.json:
        _print_json(counts)
    else:
        from rich.table import Table

        table = Table("status", "rows")
        for status, n in counts.items():
            table.add_row(status, str(n))
        _console().print(table)
    return 0


_OUTBOX_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace], Any]] = {
    "list": _outbox_list,
    "inspect": _outbox_inspect,
    "requeue": _outbox_requeue,
    "drop": _outbox_drop,
    "prune": _outbox_prune,
    "stats": _outbox_stats,
}


async def cmd_broker_serve(args: argparse.Namespace) -> int:
    members = None if args.open else load_members(args.members)
    faults = Faults(
        ack_delay=args.ack_delay,
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
        exc = _leaves(group)[0]
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TrioDrainError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    return 0


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            return


def cmd_keygen(args: argparse.Namespace) -> int:
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
        _print_json({"public_key": pubkey, "secret_key": secret})
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    db = args.db
    if db is None:
        db = str(Path(tempfile.mkdtemp(prefix="trio-drain-demo-")) / "outbox.db")
    elif os.path.exists(db):  # noqa: ASYNC240 (one stat before anything starts)
        raise UsageError(f"{db} exists; the demo wants a fresh outbox (pick another --db)")
    return await run_demo(
        db=db, messages=args.messages, max_inflight=args.max_inflight, progress=sys.stdout.isatty()
    )


# -- parsing ---------------------------------------------------------------------------------


def _number(
    kind: type[int] | type[float], what: str, low: float, high: float = math.inf
) -> Callable[[str], Any]:
    """An argparse type: `kind` parsed from text, within [low, high]."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}")
        return value

    return parse


_positive_int = _number(int, "a whole number", 1)
_port = _number(int, "a port number", 0, 65535)
_rate = _number(float, "a number", 0, 1)
_seconds = _number(float, "a number of seconds", 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-drain", description="Durable outbox delivery to brokers.")
    parser.add_argument("--version", action="version", version=f"trio-drain {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="drain N messages to a local reference broker")
    demo.add_argument("--messages", type=_positive_int, default=10_000)
    demo.add_argument("--max-inflight", type=_positive_int, default=64)
    demo.add_argument("--db", help="outbox file to create (default: a temp folder)")

    broker = sub.add_parser("broker", help="the reference broker")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    serve = broker_sub.add_parser("serve", help="serve the reference broker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8765, help="0 picks a free port")
    serve.add_argument("--db", help="SQLite file keeping accepted ids (dedupe survives restarts)")
    who = serve.add_mutually_exclusive_group(required=True)
    who.add_argument("--members", help='JSON file: {"meshId": {"memberId": "pubkey hex"}}')
    who.add_argument("--open", action="store_true", help="accept any correctly signed hello")
    serve.add_argument("--max-payload", type=_positive_int, default=1024 * 1024)
    serve.add_argument("--ack-delay", type=_seconds, default=0.0, help="fault: seconds before each ack")
    serve.add_argument("--drop-ack-rate", type=_rate, default=0.0, help="fault: share of acks never sent")
    serve.add_argument(
        "--transient-error-rate", type=_rate, default=0.0, help="fault: share of transient errors"
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
        type=_positive_int,
        default=65_536,
        help="with --compat: most characters of ciphertext, nonce and target (65536)",
    )

    run = sub.add_parser("run", help="drain an outbox until SIGINT/SIGTERM")
    run.add_argument("--db", required=True)
    run.add_argument("--config", required=True, help="TOML file with [drain] and [[mesh]] tables")

    send = sub.add_parser("send", help="accept one message into an outbox")
    send.add_argument("--db", required=True)
    send.add_argument("--mesh", required=True)
    send.add_argument("--to", required=True, help="target spec: *, #topic, @group or a 64-hex pubkey")
    send.add_argument("--priority", default="next", choices=["now", "next", "low"])
    send.add_argument("--client-id")
    send.add_argument("--json", action="store_true")
    send.add_argument("message")

    outbox = sub.add_parser("outbox", help="inspect and repair an outbox")
    outbox_sub = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in [
        ("list", "rows, newest first"),
        ("inspect", "one row"),
        ("requeue", "abort and enqueue a fresh copy"),
        ("drop", "abort a pending or dead row"),
        ("prune", "delete old done rows"),
        ("stats", "rows per status"),
    ]:
        p = outbox_sub.add_parser(name, help=helptext)
        p.add_argument("--db", required=True)
        p.add_argument("--json", action="store_true")
        if name in ("inspect", "requeue", "drop"):
            p.add_argument("id", help="row id or client_message_id")
        if name == "inspect":
            p.add_argument(
                "--full",
                action="store_true",
                help=f"the whole payload (else the first {PAYLOAD_PREVIEW} bytes)",
            )
        if name == "list":
            p.add_argument("--status", choices=[s.value for s in Status])
            p.add_argument("--limit", type=_positive_int, default=50)
        if name == "prune":
            p.add_argument(
                "--older-than", type=_seconds, default=7 * 24 * 3600.0, help="seconds (default 7 days)"
            )

    keygen = sub.add_parser("keygen", help="make an ed25519 key pair")
    keygen.add_argument("--out", help="write the secret key here (mode 0600) and print the public key")
    return parser


def _fail(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"trio-drain: error: {message}\n")
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "run": cmd_run,
        "broker": cmd_broker_serve,  # these two stop gracefully on a signal themselves
        "send": _interruptible(cmd_send),
        "outbox": _interruptible(cmd_outbox),
        "demo": _interruptible(cmd_demo),
    }
    try:
        status = cmd_keygen(args) if args.command == "keygen" else trio.run(commands[args.command], args)
    except BaseException as exc:  # the one boundary: what a user caused ends in one line
        _fail_for(exc)
    raise SystemExit(status)


def _interruptible(
    command: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """`command`, cancelled by SIGINT or SIGTERM (which then reads as an
    interrupt: exit 130, one line). Trio's own KeyboardInterrupt can wait a
    long time: a write the database has taken refuses cancellation."""

    async def run(args: argparse.Namespace) -> int:
        interrupted = False
        async with trio.open_nursery() as nursery:

            async def watch(*, task_status: trio.TaskStatus[None]) -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

            await nursery.start(watch)
            status = await command(args)
            nursery.cancel_scope.cancel()
        if interrupted:
            raise KeyboardInterrupt
        return status

    return run


def _fail_for(exc: BaseException) -> NoReturn:
    """Exit with one line for an error a user can cause; re-raise anything else.

    A nursery wraps what escapes it in an exception group, so the group's
    leaves are what count: an interrupt anywhere is exit 130; else the
    first error of ours decides the status.
    """
    leaves = _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        _fail("interrupted", EXIT_INTERRUPTED)
    if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
        # The reader went away (`| head`): nothing to say, and nowhere to say
        # it; keep the interpreter's own flush at exit quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_RUNTIME)
    for leaf in leaves:
        if isinstance(leaf, SystemExit):
            raise leaf
        if isinstance(leaf, (UsageError, ConfigError)):
            _fail(str(leaf), EXIT_USAGE)
        if isinstance(leaf, TrioDrainError):
            _fail(str(leaf), EXIT_RUNTIME)
    raise exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
