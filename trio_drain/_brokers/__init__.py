"""Brokers from the drain's side: the wire protocol, identities, the WebSocket broker client, the registry and route pacing."""
