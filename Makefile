# The README's two commands: `make demo` and `make test`. Both install what they need first.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all demo test test-fast bench lint deps clean

all: test

deps:
	@bash tools/bootstrap.sh

demo: deps
	@bash examples/demo.sh

test: deps
	$(PY) -m eemini kernel
	$(PY) -m pytest tests

test-fast: deps
	$(PY) -m pytest -m "not vm" tests

lint: deps
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m mypy

bench: deps
	$(PY) -m bench

clean:
	rm -rf build .venv .mypy_cache .ruff_cache .pytest_cache
