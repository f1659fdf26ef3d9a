# make run    build the venv if missing, then run the whole pipeline with `dvc repro`, offline, on CPU
# make test   the test suite (what .ci/run calls)
# make flow   the same stages as a Prefect flow against a temporary local Prefect server
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install run flow test clean

install: $(VENV)/.installed

# torch first, from the local CPU build; the project then finds its pin satisfied and pulls no CUDA.
$(VENV)/.installed: pyproject.toml
	@echo "install 1/3: a virtual environment in $(VENV)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "install 2/3: torch 2.13.0, the CPU build (about 200 MB)"
	$(PY) -m pip install -q torch==2.13.0
	@echo "install 3/3: loraflow and its dependencies (transformers, peft, trl, dvc, prefect, ...)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	loraflow repro
	dvc metrics show -R reports/scores --precision 3

flow: install
	loraflow run

test: install
	$(PY) -m pytest -q -x

clean:
	rm -rf data/interim data/processed models reports
