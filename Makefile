# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat setup.py | md5sum | cut -c1-8)
PYTEST_ARGS ?=

.PHONY: install install-test install-tpu lint format demo ablations test test-fast bench aot tpu-plan clean

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

# Every ablation axis on the demo task, from make demo's SFT checkpoint (trained if missing), 3 seeds; make demo's own
# finished GRPO / EKIPL runs are reused; resumable. Runs under results/ablations/, writes docs/ABLATIONS.md and
# docs/ablations_*.png. `make ablations ABLATIONS_ARGS=--plan` lists the runs and a time estimate, trains nothing.
# ABLATIONS_JOBS runs train at once, each in its own process (2: what docs/ABLATIONS.md's timing was measured with).
ABLATIONS_ARGS ?=
ABLATIONS_JOBS ?= 2
ablations: install
	$(BIN)/python experiments/ablations.py --out results --doc docs/ABLATIONS.md --jobs $(ABLATIONS_JOBS) $(ABLATIONS_ARGS)

# The whole suite (slow tests included), two workers. tests/test_aot.py runs experiments/aot.py in .venv-tpu.
test: install-test install-tpu
	$(BIN)/python -m pytest -n 2 --durations=15 tests $(PYTEST_ARGS)

# Without the tests marked slow.
test-fast: install-test install-tpu
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

# Deviceless TPU compilation (experiments/aot.py): does a config fit a TPU slice? libtpu comes with jax[tpu] (which pins
# it), so the tool gets its own venv with this package installed editable beside it. Only one process can load libtpu
# at a time (a lock file; ALLOW_MULTIPLE_LIBTPU_LOAD=1 lifts it).
TPU_VENV := .venv-tpu
JAX_TPU := jax[tpu]==0.10.2
CONFIG ?= configs/paper.py:qwen2_vl_2b,counting,ekipl
TOPOLOGY ?= v5e:2x4
AOT_ARGS ?=

$(TPU_VENV)/.installed-$(HASH): setup.py
	test -x $(TPU_VENV)/bin/python || $(PY) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/pip install -q --upgrade pip
	$(TPU_VENV)/bin/pip install -q "$(JAX_TPU)" -e .
	touch $@

install-tpu: $(TPU_VENV)/.installed-$(HASH)

# One config on one slice: make aot CONFIG=configs/paper.py:qwen2_vl_7b,spatial,grpo TOPOLOGY=v5p:2x2x1
aot: install-tpu
	$(TPU_VENV)/bin/python experiments/aot.py --config $(CONFIG) --topology $(TOPOLOGY) $(AOT_ARGS)

# Every paper config on its slices (experiments/aot.py PLAN_SLICES) -> docs/TPU_PLAN.md (+ docs/TPU_PLAN.json).
tpu-plan: install-tpu
	$(TPU_VENV)/bin/python experiments/aot.py --plan docs/TPU_PLAN.md $(AOT_ARGS)

clean:
	rm -rf $(VENV) $(TUNIX_VENV) $(TPU_VENV) results
