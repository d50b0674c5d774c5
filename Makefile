# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat setup.py | md5sum | cut -c1-8)
PYTEST_ARGS ?=

.PHONY: install install-test lint format demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-$(HASH): $(BIN)/python setup.py
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test-$(HASH): $(VENV)/.installed-$(HASH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed-$(HASH)
install-test: $(VENV)/.installed-test-$(HASH)

# One formatter for the whole tree (pyink, Google style; settings in pyproject.toml). CI runs `make lint`.
PYINK := pyink==26.5.1
$(VENV)/.pyink:
	$(BIN)/pip install -q $(PYINK)
	touch $@

lint: $(BIN)/python $(VENV)/.pyink
	$(BIN)/pyink --check --diff .

format: $(BIN)/python $(VENV)/.pyink
	$(BIN)/pyink .

# The embedded demo: synthetic data, tiny policy, SFT, then GRPO vs EKIPL; writes results/.
demo: install
	$(BIN)/python experiments/demo.py --out results

# The whole suite (slow tests included), two workers.
test: install-test
	$(BIN)/python -m pytest -n 2 --durations=15 tests $(PYTEST_ARGS)

# Without the tests marked slow.
test-fast: install-test
	$(BIN)/python -m pytest -n 2 -m "not slow" tests $(PYTEST_ARGS)

# Benchmarks, side by side with the references; writes docs/BENCHMARKS.md. tunix (a peer sampler) pins its own
# jax / flax / transformers, so it gets its own venv; experiments/bench_tunix.py runs its side there.
TUNIX_VENV := .venv-tunix

$(TUNIX_VENV)/.installed:
	$(PY) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/pip install -q --upgrade pip
	$(TUNIX_VENV)/bin/pip install -q google-tunix==0.1.7
	touch $@

bench: install-test $(TUNIX_VENV)/.installed
	$(BIN)/python experiments/bench.py --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) $(TUNIX_VENV) results
