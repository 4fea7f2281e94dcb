# alexnet2gpu: every command a user runs. `make setup` once, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the newest releases the project is tested with; a GPU
# machine with torch 2.11 to 2.14 already installed can pass TORCH_PIN= to keep its own.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install --quiet $(TORCH_PIN))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

lint: setup
	$(PY) -m ruff check alexnet2gpu tests experiments
	$(PY) -m ruff format --check alexnet2gpu tests experiments

test: lint
	$(PY) -m pytest -q --durations=10

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
