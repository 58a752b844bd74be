# Quick start: `make tune` (runs the default study) and `make test` (runs the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast tune ui dashboard ui-check bench assets clean

install: $(STAMP)

# Re-installs only when the project metadata changes; `pip install -e` keeps code edits live.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# --durations: every log (CI's too) ends with the 25 slowest tests, where the suite's time goes.
test: install
	$(PY) -m pytest -q --durations=25 tests

test-fast: install
	$(PY) -m pytest -q -m 'not slow' tests

tune: install
	$(PY) -m tune.run --space search_spaces/sft.yaml $(ARGS)

ui: install
	$(PY) -m tune.ui $(ARGS)

# Optuna's dashboard on a snapshot of the newest study's record (ARGS="--study NAME" for another).
dashboard: install
	$(PY) -m tune.ui --dashboard $(ARGS)

# A tiny study looked at in the MLflow UI and Optuna's dashboard by headless Chromium (apt-get install
# chromium); not in `make test`.
ui-check: install
	$(PY) scripts/ui_check.py $(ARGS)

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/study_overhead.py

# Regenerates the bundled demo data and tokenizer (minimind_train/assets) byte for byte.
assets: install
	$(PY) scripts/build_demo_assets.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
