"""The REST API: a thin edge over the services."""
