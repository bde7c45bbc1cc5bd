"""Helpers shared by test suites (imported as ``support``: ``tests/`` is the package root)."""
