# mmafm workspace. Quickstart: `make demo` then `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIPELINE ?= configs/pipelines/tiny.yaml
SEEDS ?= 0,1,2

.PHONY: venv data demo reproduce seeds test test-fast lab bench clean-runs

venv: $(STAMP)

# Re-installs only when the pins change; a second `make` is a no-op.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name mmafm --display-name "mmafm (.venv)" >/dev/null
	@touch $@

# Real image/text data shipped in Debian packages (idempotent; fast when installed).
data:
	@bash scripts/install_data_packages.sh

demo: venv data
	$(VENV)/bin/mmafm pipeline run $(PIPELINE)

# The reports' tables at small scale (configs/pipelines/reproduce.yaml, runs/reproduce/): the tiny
# stages the reproduce notebooks read (00, 02, 04, 05, 07), then notebooks/reproduce_pretraining
# (Tables 5, 7/8, 9), reproduce_distillation, reproduce_post_training and reproduce_compression as
# notebook entries; within 60 minutes on an idle 2-core machine. Finished entries are skipped.
reproduce: venv data
	$(VENV)/bin/mmafm pipeline run configs/pipelines/reproduce.yaml --run-id reproduce

# The pipeline once per seed (runs/seeds-seed<k>/, every stage's `seed` set to k), then each
# summary number's mean ± std over the seeds in runs/seeds/RESULTS.md (README, "Results": the
# seed spread). Three seeds of the tiny pipeline take about three times `make demo`. Finished
# seeds are skipped on a re-run. Its own run-id, so nothing lands beside `make reproduce`'s folders.
seeds: venv data
	$(VENV)/bin/mmafm pipeline run $(PIPELINE) --run-id seeds --seeds $(SEEDS)

test: venv data
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

bench: venv
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean-runs:
	rm -rf runs/
