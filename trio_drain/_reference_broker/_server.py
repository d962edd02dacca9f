"""Serving the reference broker: `serve_broker`, the `BrokerServer` it hands back, and its members file."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from .._brokers._wire import MAX_FRAME
from .._errors import ConfigError, StoreError
from .._ws import serve_websocket
from ._handler import Compat, Handler
from ._ledger import Ledger
from ._limits import CLAUDEMESH_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD, Faults
from ._statistics import BrokerStatistics, Counters

log = logging.getLogger("trio_drain.reference_broker")

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: The default: no faults. Frozen, so one instance serves every call.
_NO_FAULTS = Faults()


@attrs.define
class BrokerServer:
    """A running reference broker (what `nursery.start(serve_broker)` returns).

    Attributes:
        host: the address it listens on.
        port: the port it is bound to (the one chosen, when asked for 0).
        faults: the faults it injects.
    """

    host: str
    port: int
    _ledger: Ledger = attrs.field(repr=False)
    faults: Faults
    _counters: Counters = attrs.field(repr=False)

    @property
    def url(self) -> str:
        """The ``ws://`` URL clients connect to."""
        return f"ws://{self.host}:{self.port}/ws"

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of the broker's counters."""
        return self._counters.snapshot()

    def accepted(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(meshId, client_message_id) -> (fingerprint hex, message id)."""
        return dict(self._ledger.entries)

    def copies(self) -> dict[tuple[str, str], int]:
        """(meshId, client_message_id) -> times accepted (1 where it dedupes)."""
        return dict(self._ledger.copies)


def load_members(path: str | Path) -> dict[str, dict[str, str]]:
    """Read a members file: ``{"<meshId>": {"<memberId>": "<pubkey hex>"}}``.

    Raises:
        ConfigError: unreadable or malformed.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read members file {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"members file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in m.items())
        for m in data.values()
    ):
        raise ConfigError(f"members file {path} must map mesh ids to {{member id: 64-hex pubkey}}")
    return data


async def serve_broker(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    db: str | Path | None = None,
    members: Mapping[str, Mapping[str, str]] | None = None,
    open_mode: bool = False,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    faults: Faults = _NO_FAULTS,
    receipts: str | Path | None = None,
    compat: Compat | None = None,
    max_message_bytes: int = CLAUDEMESH_MAX_MESSAGE_BYTES,
    task_status: trio.TaskStatus[BrokerServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference broker until cancelled.

    With ``await nursery.start(serve_broker, ...)`` it returns the
    `BrokerServer` (with the bound port) once it accepts connections.

    Args:
        members: mesh id -> {member id -> pubkey hex}; required unless `open_mode`.
        open_mode: accept any correctly signed hello.
        db: SQLite file keeping what was accepted, so dedupe survives restarts.
        receipts: a file to which every send frame received is appended, as
            one ``meshId<TAB>client_message_id`` line, written at once (it
            survives the broker being killed). For counting transmissions
            in tests; it costs a write per frame.
        compat: ``"claudemesh"`` answers like the seed's real broker (see
            the package docstring); `max_payload` then does not apply.
        max_message_bytes: in compat mode, the most characters of
            ciphertext, nonce and target together (the real broker's 65,536).
    """
    if members is None and not open_mode:
        raise ConfigError("the broker needs a members file, or open mode")
    if compat not in (None, "claudemesh"):
        raise ConfigError(f"unknown compat mode {compat!r} (known: claudemesh)")
    try:
        ledger = await trio.to_thread.run_sync(Ledger, None if db is None else Path(db))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the broker's database {db}: {exc}") from None
    counters = Counters()
    server_state = BrokerServer(host=host, port=port, ledger=ledger, faults=faults, counters=counters)
    handler = Handler(
        ledger=ledger,
        faults=faults,
        counters=counters,
        members=dict(members or {}),
        open_mode=open_mode,
        max_payload=max_payload,
        compat=compat,
        max_message_bytes=max_message_bytes,
    )
    if receipts is not None:
        handler.receipts_fd = os.open(receipts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            server_state.port = await nursery.start(
                functools.partial(
                    serve_websocket,
                    handler.handle,
                    host,
                    port,
                    max_message_size=max(MAX_FRAME, 2 * max_payload),
                )
            )
            log.info("reference broker listening on %s", server_state.url)
            task_status.started(server_state)
    finally:
        await ledger.aclose()
        if handler.receipts_fd is not None:
            os.close(handler.receipts_fd)
