"""The command line: thin commands over the REST API, plus the local ones (serve, keys)."""
