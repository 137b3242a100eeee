# kernelfleet: `make up` runs the platform on this machine, `make test` runs every test,
# `make bench` compares it with the stock stack on this machine (bench/README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: up test test-fast bench lint

up: $(INSTALLED)
	$(BIN)/kernelfleet up

test: $(INSTALLED)
	$(BIN)/kernelfleet setup --tests
	$(BIN)/python -m pytest -p no:cacheprovider

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -p no:cacheprovider -m "not e2e and not browser"

# `make bench BENCH_ARGS="--only latency,admission --quick"` runs a subset (bench/README.md).
bench: $(INSTALLED)
	$(BIN)/kernelfleet setup
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check kernelfleet scheduler gateway hub tests bench

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[scheduler,hub,notebook,dev]'
	touch $(INSTALLED)
