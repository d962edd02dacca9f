"""The reference broker: the seed's wire protocol served over WebSocket, with a durable ledger and fault knobs for tests."""
