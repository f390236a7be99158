# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Each installs what it needs first (scripts/install.sh; never CUDA wheels on a CPU machine).
PYTHON ?= python3
export PYTHON

.PHONY: install demo test bench gpu-check

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) -m deepalign demo --output runs/demo

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) -m benchmarks.topk_rank
	$(PYTHON) -m benchmarks.topk_selection_cost
	$(PYTHON) -m benchmarks.prefill_attention
	$(PYTHON) -m benchmarks.rap
	$(PYTHON) -m benchmarks.cls_decoding
	$(PYTHON) -m benchmarks.gcg_prefix_cache
	$(PYTHON) -m benchmarks.training_throughput

# On a lent GPU with no network: GPU tests, the compile check for the device, kernel benchmarks (< 8 min).
gpu-check:
	bash scripts/gpu_check.sh
