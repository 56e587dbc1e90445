# Two set-up commands (see README): `make demo` runs the offline fine-tuning demo, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python examples/finetune.py --output_dir outputs/demo

test: $(STAMP)
	$(BIN)/ruff check mmft_hf tests examples benchmarks
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check mmft_hf tests examples benchmarks
	$(BIN)/ruff format --check mmft_hf tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff format mmft_hf tests examples benchmarks
	$(BIN)/ruff check --fix mmft_hf tests examples benchmarks

clean:
	rm -rf $(VENV) outputs build *.egg-info
