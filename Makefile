# kdpipe: `make all` runs the default pipeline (pipelines/default.toml), `make test` the tests.
# Every step is a real file target (manifest.json, metrics.json, report.md): a second `make all`
# does nothing, and a change rebuilds what it invalidates. `make help` lists the targets.

PYTHON     ?= python3
VENV       ?= .venv
PIPELINE   ?= pipelines/default.toml
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
SETUP      := $(VENV)/.kdpipe-setup
KDPIPE     := $(VENV)/bin/kdpipe
PIPELINE_NAME := $(basename $(notdir $(PIPELINE)))
RULES      := build/$(PIPELINE_NAME).mk

# kdpipe needs Python 3.11 or later (tomllib; pyproject's requires-python). An older python3 (Ubuntu 22.04's 3.10)
# failed make all with a traceback (No module named 'tomllib'), and make test only after installing torch.
CHECK_PYTHON = $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Error: PYTHON=$(PYTHON) is \
  Python %d.%d, and kdpipe needs 3.11 or later: install one and give it, e.g. make PYTHON=python3.11" \
  % sys.version_info[:2])'

.DELETE_ON_ERROR:
.DEFAULT_GOAL := all
.PHONY: all help setup data test bench bench-quick clean distclean

all: $(SETUP) data pipeline ## Set up, then run the pipeline (train teacher, dump logits, train students, report)
	@echo "report: runs/$(PIPELINE_NAME)/report/report.md"

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16
	@echo "variables: PIPELINE=$(PIPELINE) VENV=$(VENV) TORCH_PKGS='$(TORCH_PKGS)'"

setup: $(SETUP) ## Create the virtual environment and install kdpipe with its dependencies

# make -j all ran the pipeline's first step (each step waits for $(SETUP)) beside make data, before the default
# data was installed: with all among the goals, $(SETUP) is made after data.
ifneq ($(filter all,$(MAKECMDGOALS))$(if $(MAKECMDGOALS),,all),)
$(SETUP): | data
endif

$(SETUP): pyproject.toml
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PKGS)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

data: ## Install Debian's dataset-fashion-mnist (the default data) where apt-get is available
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "note: could not install dataset-fashion-mnist; pipelines on other data still run"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "note: could not install dataset-fashion-mnist; pipelines on other data still run"; \
	else echo "note: no apt-get here; give the pipeline's [data] a root holding the Fashion-MNIST IDX files"; fi

# The pipeline's rules are generated from its TOML spec (standard library only, no setup needed), at every make
# and written only when they change (so make reads them again only then). Made only when the TOML was newer, the
# rules of exp/mine.toml were those last made from pipelines/mine.toml (both build/mine.mk), and a TOML copied with
# its old time (cp -p, rsync -a) was not read: make ran or skipped the steps of settings it no longer held.
$(RULES): FORCE
	@mkdir -p $(dir $@)
	@$(CHECK_PYTHON)
	@$(PYTHON) -m kdpipe.pipeline $(PIPELINE) build/$(PIPELINE_NAME) > $@.tmp && \
	  if cmp -s $@.tmp $@; then rm $@.tmp; else echo "rules of $(PIPELINE): $@"; mv $@.tmp $@; fi
FORCE:

# The goals that need no pipeline rules. Any other goal (all, pipeline, a file), or none, includes them: with
# `make clean all` or `make setup all` the rules were left out, and all printed a report path without running a step.
NO_RULES := help setup data test bench bench-quick clean distclean
ifneq ($(filter-out $(NO_RULES),$(MAKECMDGOALS))$(if $(MAKECMDGOALS),,all),)
# clean removes build/ (the rules' stamps) after make has read the rules: the steps would then have no stamp.
ifneq ($(filter clean distclean,$(MAKECMDGOALS)),)
$(error make $(MAKECMDGOALS): $(filter clean distclean,$(MAKECMDGOALS)) removes the pipeline's rules that \
  $(filter-out $(NO_RULES),$(MAKECMDGOALS)) needs: run `make $(filter clean distclean,$(MAKECMDGOALS))` first, then \
  `make $(filter-out clean distclean,$(MAKECMDGOALS))`)
endif
# PIPELINE's path is part of file names, Make targets and command lines: a space or a shell character in it
# broke make in ways that did not name the cause; a missing file got "No rule to make target".
ifneq ($(shell printf '%s\n' '$(PIPELINE)' | LC_ALL=C grep -qx '[A-Za-z0-9_./-]*' && echo ok),ok)
$(error PIPELINE=$(PIPELINE): a pipeline file's path may hold only letters, digits, '_', '.', '-' and '/': \
  rename the file)
endif
ifeq ($(wildcard $(PIPELINE)),)
# make -C REPO from an experiment's folder reads PIPELINE from REPO, not from that folder: say where it looked.
$(error PIPELINE=$(PIPELINE): no such file in $(CURDIR) (a path from the folder make runs in; pipelines/*.toml \
  lists the shipped ones))
endif
include $(RULES)
endif

.PHONY: pipeline
pipeline: $(PIPELINE_TARGET) ## Run the pipeline only, without make data (sets up the venv if it is missing)

test: $(SETUP) data ## Run the test suite (CPU, small real data)
	$(VENV)/bin/python -m pytest

bench-quick: $(SETUP) ## CPU benchmarks, under a minute; print ratios, assert nothing
	$(VENV)/bin/python bench/run_all.py --quick

bench: $(SETUP) ## Full benchmarks (GPU figures when CUDA is present)
	$(VENV)/bin/python bench/run_all.py

clean: ## Remove pipeline outputs (runs/, cache/*, build/), keep the venv
	rm -rf runs build
	[ ! -d cache ] || find cache -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

distclean: clean ## Also remove the virtual environment
	rm -rf $(VENV)
