PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-test demo test bench bench-dry clean

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

# Installs, then runs the whole pipeline on the shipped addition task.
demo: install
	$(PYTHON) -m jrlhf.demo

# Installs, then runs the whole test suite.
test: install-test
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

bench: install-test
	$(PYTHON) -m benchmarks.run

# Checks the GPU/TPU-sized benchmark plan without timing anything.
bench-dry: install-test
	$(PYTHON) -m benchmarks.run --dry-run --size qwen2-0.5b

clean:
	rm -rf build dist *.egg-info .pytest_cache runs
