"""The WebSocket layer: an RFC 6455 codec, the connection engine over a Trio stream, clients and a server."""
