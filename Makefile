# `make demo` and `make test` create (or reuse) .venv and install the pinned
# requirements (with those of the test and plot extras, so that the tests
# cover the figures) plus this package (editable) before running anything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo

.PHONY: install test demo benchmark results wheels clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e ".[test,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadscope tests

NTH := $(PY) -m launch.train --config=nth_farthest:cpu

demo: $(STAMP)
	$(NTH) --config.core=rmc --workdir=$(WORKDIR)/rmc
	$(NTH) --config.core=lstm --workdir=$(WORKDIR)/lstm
	@echo
	@echo "Nth farthest, 3 objects x 2 features, same budget for both cores."
	@echo "Guessing without relational reasoning plateaus at 66.7% held-out accuracy."
	$(PY) -m launch.plot --workdirs=$(WORKDIR)/rmc,$(WORKDIR)/lstm \
	    --out=$(WORKDIR)/nth_farthest.png

# Regenerates docs/results.md and its figures from the run workdirs named in
# docs/results_manifest.json (the page lists the command that made each run).
results: $(STAMP)
	$(PY) -m launch.report --manifest=docs/results_manifest.json --out=docs/results.md

benchmark: $(STAMP)
	$(PY) -m benchmarks.core_throughput

# The pure-Python packages that a GPU/TPU machine with its own jax but no
# network lacks, as wheels for benchmarks.accelerator_check (see its docstring).
wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
	    dm-haiku==0.0.17 jmp==0.0.4 ml_collections==1.1.0

clean:
	rm -rf $(VENV) *.egg-info
