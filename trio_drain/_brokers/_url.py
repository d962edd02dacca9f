"""Which broker URLs are usable: refused when configured, not at the first connection attempt."""

from __future__ import annotations

from urllib.parse import urlsplit

from .._errors import ConfigError


def check_broker_url(url: object) -> None:
    """Refuse a broker URL no connection attempt could use.

    Raises:
        ConfigError: not a string, not ws:// or wss://, no host, or a port
            outside 1-65535.
    """
    if not isinstance(url, str):
        raise ConfigError(f"broker URL must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"broker URL {url!r} must start with ws:// or wss://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    if port == 0:
        raise ConfigError(f"broker URL {url!r}: port must be between 1 and 65535")
