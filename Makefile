# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: run test redteam faults lint format screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(PIP) -e ".[dev]"
	touch $@

## run: set up and start the embedded demo at http://127.0.0.1:8000
run: $(VENV)/.installed-run
	$(BIN)/python -m config.launch

## test: lint, check the import layers and run the whole test suite
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

## redteam: the full red-team suite (every attack and benign task; prints its figures)
redteam: $(VENV)/.installed-dev
	$(BIN)/python -m tests.redteam

## faults: the fault suite at scale, on the PostgreSQL of DATABASE_URL (prints its figures)
faults: $(VENV)/.installed-dev
	BATON_REQUIRE_SERVICES=1 BATON_FAULTS_ROUNDS=$${BATON_FAULTS_ROUNDS:-5} \
	BATON_FAULTS_RUNS=$${BATON_FAULTS_RUNS:-30} $(BIN)/pytest -q -s -p no:cacheprovider tests/faults

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var
