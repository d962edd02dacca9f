"""The SQLite back end: the embedded default."""
