# The two commands of the README: `make run` (the demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

run: $(VENV)/.installed
	$(BIN)/fieldsync demo

test: $(VENV)/.installed tests/interop/node_modules/.installed clients/ts/dist/.built
	$(BIN)/pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check fieldsync tests bench
	$(BIN)/ruff format --check fieldsync tests bench
	$(BIN)/mypy

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

tests/interop/node_modules/.installed: tests/interop/package.json tests/interop/package-lock.json
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client (`@fieldsync/client`): installed and built before the tests that run it.
clients/ts/dist/.built: clients/ts/package.json clients/ts/package-lock.json clients/ts/tsconfig.json $(wildcard clients/ts/src/*.ts)
	cd clients/ts && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent
	touch $@

clean:
	rm -rf $(VENV) .data tests/interop/node_modules clients/ts/node_modules clients/ts/dist
