# Two set-up commands (see README): `make demo` runs the offline fine-tuning demo, `make test` the suite.
# `make results` reruns the synthetic benchmark and rewrites the README's results table (scripts/readme_results.py).
# `make test-floor` runs the suite again in a fresh venv holding every dependency at the floor of its range.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLOOR_VENV ?= .venv-floor
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

LINTED := mmft_hf tests examples benchmarks scripts

.PHONY: install demo results test test-floor lint format clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/mmft-hf finetune --output_dir outputs/demo

results: $(STAMP)
	OMP_NUM_THREADS=2 $(OFFLINE) $(BIN)/python scripts/readme_results.py

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(OFFLINE) $(BIN)/python -m pytest tests

# Every dependency pinned (pip -c) to the lower bound of its range in setup.cfg; see constraints/floor.txt.
test-floor:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/pip install --quiet -c constraints/floor.txt torch
	$(FLOOR_VENV)/bin/pip install --quiet -c constraints/floor.txt -e ".[test]"
	$(FLOOR_VENV)/bin/pip check
	$(FLOOR_VENV)/bin/python -c "import importlib.metadata as m, re; floors = re.findall(r'^([\w.-]+)==', open('constraints/floor.txt').read(), re.M); print('floors:', *(f'{n}=={m.version(n)}' for n in floors))"
	$(FLOOR_VENV)/bin/ruff check $(LINTED)
	$(OFFLINE) $(FLOOR_VENV)/bin/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(STAMP)
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) outputs build *.egg-info
