# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv (torch from this machine's local wheels via constraints.txt) when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-all clean

$(VENV)/.installed: pyproject.toml constraints.txt
	bash scripts/setup_venv.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lorax demo

test: setup
	$(PY) -m pytest -q -m "not gpu" tests

test-all: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf data state memory reports flows cache mlflow.db mlartifacts outputs dvc_plots dvc.lock .dvc/cache .dvc/tmp
