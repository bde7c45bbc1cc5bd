"""Contract tests for the store, run identically on SQLite and PostgreSQL."""
