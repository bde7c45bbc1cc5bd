# The two commands: `make run` starts the gateway, `make test` installs test needs and runs them.
.PHONY: run test lint fmt

# Arguments for serve: make run ARGS="--data /srv/fleetgate"
run:
	scripts/run $(ARGS)

test:
	scripts/test

lint:
	.venv/bin/ruff check src tests bench && .venv/bin/ruff format --check src tests bench && .venv/bin/mypy

fmt:
	.venv/bin/ruff format src tests bench && .venv/bin/ruff check --fix src tests bench
