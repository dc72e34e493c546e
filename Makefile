# The two commands a new user needs (see README.md):
#   make demo   set up .venv and run the default self-play demo on the CPU
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-all bench scaling setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/alphareason train --config configs/countdown_tiny.py --workdir $(WORKDIR)

# glibc's transparent-huge-page setting (alphareason/host_memory.py; the
# alphareason command sets it itself): XLA's per-call buffers then cost a few
# hundred page faults instead of tens of thousands. Ignored elsewhere.
HUGE_PAGES := GLIBC_TUNABLES=$(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1

# Two worker processes (pytest-xdist), each test file on one of them: most of a cold run is XLA
# compilation, which runs on one core per process.
test: $(VENV)/.installed
	$(HUGE_PAGES) $(PY) -m pytest -q -n 2 --dist loadfile --durations=20 -m "not slow" tests

test-all: $(VENV)/.installed
	$(HUGE_PAGES) $(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.installed
	$(VENV)/bin/alphareason bench model --out benchmarks/results/model.json
	$(VENV)/bin/alphareason bench search --out benchmarks/results/search.json
	rm -rf runs/bench_demo  # the self-play benchmark times a whole run from scratch
	$(VENV)/bin/alphareason bench selfplay --out benchmarks/results/selfplay.json --workdir runs/bench_demo \
	    --config.train.steps=600 --config.selfplay.iterations=4
	$(VENV)/bin/alphareason bench search --workdir runs/bench_demo --out benchmarks/results/search_trained.json

scaling: $(VENV)/.installed
	$(VENV)/bin/alphareason scaling --config configs/scaling_reduced.py --out runs/scaling_reduced --train

clean:
	rm -rf $(VENV) runs
