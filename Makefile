# The two commands a newcomer needs: `make run` (the daemon on the embedded default setup)
# and `make test` (lint, types and the whole test suite, exactly what CI runs).
VENV := .venv
BIN := $(VENV)/bin
STATE ?= .portsd

.PHONY: run test lint bench man distro
$(VENV)/.installed: pyproject.toml constraints.txt tools/bootstrap
	tools/bootstrap

run: $(VENV)/.installed
	$(BIN)/portsd serve --tree . --state $(STATE) $(if $(PORT),--port $(PORT))

lint: $(VENV)/.installed
	$(BIN)/ruff check portsd tests bench
	$(BIN)/ruff format --check portsd tests bench
	$(BIN)/mypy

# what only the tests need (a browser for the status page), never installed by `make run`
$(VENV)/.test-tools: $(VENV)/.installed
	PORTSD_TEST=1 tools/bootstrap
	touch $@

test: lint $(VENV)/.test-tools
	$(BIN)/pytest -n 2 -q

# man/ports.1 and man/portsd.8, generated from the parsers
man: $(VENV)/.installed
	$(BIN)/python -m portsd.cli.manpage man

bench: $(VENV)/.installed
	PORTSD_BENCH=1 tools/bootstrap
	$(BIN)/python -m bench

# The base system of ports/ bootstrapped through a local `portsd serve` (docs/distro.md):
# hours, resumable. `make run` never starts it: the base is built for x86_64_musl only.
distro: $(VENV)/.installed
	tools/distro
