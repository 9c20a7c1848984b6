# `make demo` and `make test` are all a new user needs (see README.md).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install services browser demo test test-slow test-unit bench bench-sweep bench-history bench-steps bench-delayed chaos clean lock

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

services:
	./scripts/ensure-services.sh

browser:
	./scripts/ensure-browser.sh

demo: install services
	$(PY) -m examples.demo

test: install services browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n 3 -m "not slow"

test-slow: install services
	$(VENV)/bin/pytest -m slow

test-unit: install
	$(VENV)/bin/pytest tests/test_units.py tests/test_deployment.py

# The benchmarks also need what Baton is compared with (Celery) and matplotlib: the `bench` extra.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	touch $@

# Baton beside Celery: burst throughput, post -> start latency, CPU per task, step checkpoints.
bench: $(VENV)/.bench-installed services
	$(PY) bench/compare.py

# Throughput and p99 latency against offered rate, Baton and Celery; writes docs/performance.png.
bench-sweep: $(VENV)/.bench-installed services
	$(PY) bench/sweep.py

# Throughput, latency and the periodic queries' plans beside 1,000 / 100,000 / 1,000,000 finished executions.
bench-history: install services
	$(PY) bench/history.py

bench-steps: install services
	$(PY) bench/steps.py

bench-delayed: install services
	$(PY) bench/delayed.py

# Ten minutes of faults under load (private PostgreSQL and RabbitMQ); prints the seed and writes chaos-report.json.
chaos: install services
	$(PY) bench/chaos.py --duration 600

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The Docker image installs exactly these versions, checked by hash; refresh after changing dependencies.
lock: install
	$(VENV)/bin/pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file=requirements.lock pyproject.toml
