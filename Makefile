# Herald: `make test` installs what the suite needs into .venv and runs all of it
# (lint, type checks, unit, integration, end-to-end with Compose and a browser).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Which base images the Docker-backed tests use: auto, local or official
# (see scripts/test-env.sh).
export HERALD_IMAGES ?= auto

.PHONY: test deps lint unit integration e2e bench bench-webhooks bench-tls images up down clean

test: lint
	eval "$$(scripts/test-env.sh)" && $(BIN)/pytest

deps: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt publisher-service/requirements.txt stream-service/requirements.txt clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest tests/unit

integration: deps
	eval "$$(scripts/test-env.sh)" && $(BIN)/pytest tests/unit tests/integration

e2e: deps
	eval "$$(scripts/test-env.sh)" && $(BIN)/pytest tests/e2e

bench: deps
	$(BIN)/python -m tests.load.bench $(BENCH_ARGS)

# What occupancy and webhooks cost (tests/load/webhooks.py; needs redis-server or --redis-url).
bench-webhooks: deps
	$(BIN)/python -m tests.load.webhooks $(BENCH_ARGS)

# What HTTPS and HTTP/2 at the front door cost per delivery (tests/load/tls.py; Docker).
bench-tls: deps
	$(BIN)/python -m tests.load.tls $(BENCH_ARGS)

# Local stand-ins for the official base images (no registry needed).
images:
	bash scripts/build-local-images.sh

up:
	docker compose up --build

down:
	docker compose down -v

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
