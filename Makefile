# Two commands: `make demo` and `make test`. Everything else is set-up they share.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := $(CURDIR)/.demo

.PHONY: demo demo-stop test unit integration lint bench sysdeps deps guest web clean

demo: sysdeps deps guest web
	@DEMO_DIR=$(DEMO_DIR) BIN=$(BIN) ./scripts/demo.sh

demo-stop:
	@DEMO_DIR=$(DEMO_DIR) BIN=$(BIN) ./scripts/demo.sh stop

test: sysdeps deps guest web lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: deps
	$(BIN)/pytest -q tests/unit tests/contract

integration: sysdeps deps guest web
	$(BIN)/pytest -q tests/integration

lint: deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: sysdeps deps guest
	$(BIN)/python -m bench.lifecycle

sysdeps:
	@./scripts/install-system-deps.sh

deps: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

guest: deps
	@$(BIN)/stoker guest build

# the web console's htmx, its SSE extension and uPlot, pinned by package-lock.json, installed
# into src/stoker/web/node_modules (served by the agent under /ui/vendor, never committed)
WEB := src/stoker/web
web: $(WEB)/node_modules/.installed

$(WEB)/node_modules/.installed: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis $(DEMO_DIR) $(WEB)/node_modules
