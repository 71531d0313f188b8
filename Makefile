# attriflow: the two commands of the README live here.
#   make run    creates .venv when missing, then runs the default pipeline end to end
#   make test   creates .venv when missing (and installs Debian's chromium for the report's
#               browser test when missing), then runs the test suite
#   make bench  the performance comparison of issue #8 (about 40 minutes on two cores):
#               benchmarks/results/*.json, rendered as benchmarks/RESULTS.md
#   make scale  512 and 4,096 images and the map encodings (about 70 minutes on two cores):
#               benchmarks/results/scale-*.json, rendered as benchmarks/SCALE.md
#   make gpu    the GPU checks on a machine with CUDA (at most 8 minutes): benchmarks/GPU.md
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# the slowest tests are listed at the end of every run (the suite must stay under 25 minutes)
PYTEST_ARGS ?= --durations=30
RUN_DIR ?= runs/default
CONFIG ?=

.PHONY: run test env bench scale gpu

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(VENV)/bin/attriflow run $(CONFIG) --run-dir $(RUN_DIR)

test: $(STAMP)
	@tools/ensure-chromium $(VENV)/chromium-install.log
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	rm -f benchmarks/results/*-rerun*.json
	$(VENV)/bin/python benchmarks/peers.py --model resnet50
	$(VENV)/bin/python benchmarks/peers.py --model reference
	$(VENV)/bin/python benchmarks/peers.py --model vgg16 --reps 2
	$(VENV)/bin/python benchmarks/peers.py --model resnet50 --precision bf16 --reps 1 --no-peers
	$(VENV)/bin/python benchmarks/peers.py --model reference --precision bf16 --no-peers
	ATTRIFLOW_ALLOCATOR=default $(VENV)/bin/python benchmarks/peers.py --model resnet50 --peer-defaults-only --allocator default
	$(VENV)/bin/python benchmarks/pipeline.py
	$(VENV)/bin/python benchmarks/results.py

scale: $(STAMP)
	$(VENV)/bin/python benchmarks/scale.py --samples 512 --settings light
	$(VENV)/bin/python benchmarks/scale.py --samples 4096 --settings light
	$(VENV)/bin/python benchmarks/scale.py --encodings $${TMPDIR:-/tmp}/attriflow-scale-4096-light
	$(VENV)/bin/python benchmarks/scale.py --render

gpu: $(STAMP)
	bash benchmarks/gpu.sh
