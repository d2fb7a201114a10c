# One entry point for humans and CI. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-unit lint format bench stack-up stack-down clean

setup: $(STAMP)

# Re-installs when the pins change. requirements.lock pins the whole resolved tree; the torch pair
# installs from the registry (or this machine's wheel cache) as a CUDA build that also runs on CPU.
# --no-compile: byte-compiling all ~26,000 modules of the tree costs ~2 min on 2 cores; Python
# compiles the few thousand it imports on first use instead.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c requirements.lock -e ".[dev]"
	touch $@

# The main job end to end on the embedded default: local Ray, local MLflow store, local files, tiny model.
quickstart: setup
	$(BIN)/python jobs/quickstart.py

test: setup
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/preprocess.py

stack-up: setup
	$(BIN)/python -m dragonfly_platform.services up

stack-down: setup
	$(BIN)/python -m dragonfly_platform.services down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
