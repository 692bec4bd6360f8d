# twin: `make run` serves the sample city on http://127.0.0.1:8000, `make test` runs every test.
# Both install what is missing first (Debian packages as root, then a Python virtualenv).

SHELL := /bin/bash
VENV := .venv
PG_VERSION := 15
PG_SHARE := /usr/share/postgresql/$(PG_VERSION)/extension
PG_PACKAGES := postgresql-$(PG_VERSION) postgresql-$(PG_VERSION)-postgis-3 postgresql-$(PG_VERSION)-pgrouting \
	postgresql-$(PG_VERSION)-partman
# The MQTT broker sensor platforms publish to (twin runs its own: twin/core/broker.py).
BROKER_PACKAGES := mosquitto
# The proxy and shared tile cache in front of several twin nodes (`twin cluster up`:
# twin/core/proxy.py); Debian's nginx-light has the proxy and cache modules it needs.
PROXY_PACKAGES := nginx-light
PYTEST_ARGS ?=

.PHONY: run test system-deps browser-deps venv web lint clean-db

run: system-deps venv web
	$(VENV)/bin/twin run

test: system-deps browser-deps venv web lint
	[ -d tests/js/node_modules ] || npm ci --prefix tests/js --no-audit --no-fund
	@# The managed cluster is stopped again afterwards if this run started it (a `make run`
	@# serving from it keeps it).
	@if $(VENV)/bin/twin db status 2>&1 | grep -q 'PostGIS: running'; then started=0; else started=1; fi; \
	$(VENV)/bin/twin db up && $(VENV)/bin/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$started = 1 ]; then $(VENV)/bin/twin db down; fi; exit $$status

# Style (ruff), the import contracts of pyproject.toml (import-linter: roof -> libraries ->
# floor, no sample city in production, frozen migrations) and types (mypy).
lint: venv
	$(VENV)/bin/ruff check twin tiles layers data_samples tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Debian packages: PostgreSQL with PostGIS, pgRouting and pg_partman (readings partitioned by
# day), mosquitto (the MQTT broker), nginx (the proxy of several nodes), Python's venv module, and Node.js (npm runs the MapLibre
# style validator in the tests).
# Debian's own 'main' cluster is not created: twin runs its own (see twin/core/cluster.py).
system-deps:
	@missing=0; \
	for f in /usr/lib/postgresql/$(PG_VERSION)/bin/initdb $(PG_SHARE)/postgis.control $(PG_SHARE)/pgrouting.control \
	    $(PG_SHARE)/pg_partman.control /usr/sbin/mosquitto /usr/sbin/nginx; do \
	  [ -e "$$f" ] || missing=1; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing=1; \
	command -v npm >/dev/null || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo "Installing Debian packages: $(PG_PACKAGES) $(BROKER_PACKAGES) $(PROXY_PACKAGES) python3-venv nodejs npm"; \
	  mkdir -p /etc/postgresql-common; \
	  [ -e /etc/postgresql-common/createcluster.conf ] || echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $(PG_PACKAGES) $(BROKER_PACKAGES) $(PROXY_PACKAGES) python3-venv python3-dev build-essential \
	    $$(command -v npm >/dev/null || echo nodejs npm); \
	fi

# Debian's chromium for the browser tests (Playwright drives it; browser downloads do not work
# offline), and a CJK font so the map's Chinese is legible in the test screenshots.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || ! fc-list 2>/dev/null | grep -qi 'wenquanyi\|noto sans cjk'; then \
	  echo "Installing Debian packages: chromium fonts-wqy-microhei"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends chromium fonts-wqy-microhei; \
	fi

# The command-hall map (web/): npm ci when the lockfile changes, a build (API types, tsc, vite)
# when a source or twin's API does. The API's OpenAPI document is dumped on every make (no
# database needed) but rewritten only when it changed, so an API change rebuilds the map and
# tsc checks the map against the new types (web/src/generated/, not committed).
WEB_SOURCES := $(shell find web/src -type f -not -path 'web/src/generated/*' 2>/dev/null) \
	web/index.html web/package.json web/vite.config.ts web/tsconfig.json
WEB_OPENAPI := web/src/generated/openapi.json

web: web/dist/index.html

web/node_modules/.package-lock.json: web/package-lock.json
	npm ci --prefix web --no-audit --no-fund

$(WEB_OPENAPI): FORCE | venv
	$(VENV)/bin/python -m twin.api.openapi_dump $@

web/dist/index.html: web/node_modules/.package-lock.json $(WEB_OPENAPI) $(WEB_SOURCES)
	npm run --prefix web build

FORCE:

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean-db:
	-$(VENV)/bin/twin db down
	rm -rf .twin
