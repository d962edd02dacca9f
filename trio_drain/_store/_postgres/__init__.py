"""The PostgreSQL back end: one outbox shared by many drain processes on many hosts."""
