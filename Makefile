# Plain targets the README quotes. `make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0; on a GPU machine use e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup demo chat-demo test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,deepspeed]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) train.py --demo

chat-demo: setup
	$(PY) chat.py --demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.bench_dpo --preset cpu-small --data ultrafeedback --compare trl

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
