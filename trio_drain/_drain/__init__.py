"""The drain worker: claims rows, sends them through the registry, records outcomes."""
