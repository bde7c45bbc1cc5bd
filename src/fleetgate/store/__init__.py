"""Durable state behind a small interface; SQLite by default, PostgreSQL for several nodes."""

from fleetgate.store.database import Database, IntegrityViolation, Row, Tx
from fleetgate.store.open import open_database

__all__ = ["Database", "IntegrityViolation", "Row", "Tx", "open_database"]
