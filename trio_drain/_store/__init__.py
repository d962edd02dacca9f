"""Storage back ends for the outbox, behind one interface (`OutboxBackend`)."""
