# The two commands of the README: `make run` (the demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

DASHBOARD := fieldsync/api/dashboard/app.js
# More options for `fieldsync demo`, e.g. make run DEMO="--ldap ldap://host ...".
DEMO ?=

# More options for `fieldsync cluster`, e.g. make cluster CLUSTER="--nodes 5 --port 9001".
CLUSTER ?=

.PHONY: run cluster test lint bench clean dashboard

run: $(VENV)/.installed $(DASHBOARD)
	$(BIN)/fieldsync demo $(DEMO)

# Three nodes on this machine's PostgreSQL and Redis (database fieldsync_cluster, created when
# missing), with the demo's development issuer; Ctrl-C stops them.
cluster: $(VENV)/.installed
	$(BIN)/fieldsync cluster $(CLUSTER)

test: $(VENV)/.installed tests/interop/node_modules/.installed clients/ts/dist/.built $(DASHBOARD)
	$(BIN)/pytest -q

lint: $(VENV)/.installed web/dashboard/node_modules/.installed clients/ts/dist/.built
	$(BIN)/ruff check fieldsync tests bench
	$(BIN)/ruff format --check fieldsync tests bench
	$(BIN)/mypy
	cd web/dashboard && npm run --silent check

# The web dashboard (served at /dashboard/): TypeScript, the TypeScript client (linked from
# clients/ts, built first) and Yjs bundled by esbuild into the package, so nothing is fetched
# from elsewhere at run time.
dashboard: $(DASHBOARD)

$(DASHBOARD): web/dashboard/node_modules/.installed clients/ts/dist/.built web/dashboard/build.mjs web/dashboard/index.html web/dashboard/style.css $(wildcard web/dashboard/src/*.ts)
	cd web/dashboard && npm run --silent build

web/dashboard/node_modules/.installed: web/dashboard/package.json web/dashboard/package-lock.json
	cd web/dashboard && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

tests/interop/node_modules/.installed: tests/interop/package.json tests/interop/package-lock.json
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client (`@fieldsync/client`): installed and built before the tests that run it
# and the dashboard that uses it (and before `make lint` type-checks the dashboard against it).
clients/ts/dist/.built: clients/ts/package.json clients/ts/package-lock.json clients/ts/tsconfig.json $(wildcard clients/ts/src/*.ts)
	cd clients/ts && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent
	touch $@

clean:
	rm -rf $(VENV) .data tests/interop/node_modules clients/ts/node_modules clients/ts/dist \
		web/dashboard/node_modules fieldsync/api/dashboard
