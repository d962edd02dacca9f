"""Log lines on stderr, as text or JSON, with untrusted words made inert."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .._display import visible

#: The commands' own logger; its name shows in every line they log.
log = logging.getLogger("trio_drain.cli")


class TextFormatter(logging.Formatter):
    """Log lines with every message made inert: a broker's words, a row's
    error or a client id may quote terminal escapes (JSON logs escape them
    by themselves)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(visible(line) for line in super().formatException(ei).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and traceback."""

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


def setup_logging(level: str, fmt: str) -> None:
    """Send the library's logs to stderr.

    Args:
        level: `debug`, `info`, `warning` or `error`.
        fmt: `text` or `json`.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("trio_drain")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
