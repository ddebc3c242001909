# Everything runs from a virtual environment the Makefile creates on first use.
# Every install goes through constraints.txt, which pins the CPU build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# megatron-core 0.19.x declares Python >= 3.12; on 3.11 it is installed beside the
# main environment and put first on PYTHONPATH for the second test run.
MCORE019 := $(VENV)/mcore-0.19
MCORE019_VERSION ?= 0.19.2
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1
export GLOO_SOCKET_IFNAME ?= lo
export DS_BUILD_OPS ?= 0
# What the CPU reports as its fp16 support (oneDNN fp16 kernels: AVX512-FP16/AMX-FP16), which
# DeepSpeed's CPU accelerator consults: absent, present, or empty for the CPU's own answer.
# `make test INRUN_CPU_FP16=absent` runs the suite as on a CPU without it; the CPU shims make
# DeepSpeed fp16 train, and its tests pass, either way.
export INRUN_CPU_FP16 ?=

.PHONY: venv test test-fast lint format demo curate-demo bench bench-scores clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0 numpy
	$(PIP) install -q -c constraints.txt -e '.[megatron,deepspeed,mpi,dev,pretrain,tensorboard,analysis,hf]'
	$(PIP) install -q --no-deps --ignore-requires-python --target $(MCORE019) megatron-core==$(MCORE019_VERSION)
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite on megatron-core 0.16.x, then the Megatron tests again on 0.19.x.
test: lint
	$(PY) -m pytest -q tests
	PYTHONPATH=$(MCORE019) $(PY) -m pytest -q -m megatron tests

test-fast: venv
	$(PY) -m pytest -q -x tests -m "not slow"

demo: venv
	PATH=$(VENV)/bin:$$PATH bash launch/demo.sh

# Train with scoring, curate, retrain on the kept data against the full data and a random drop;
# ends with steps_saved=<fraction> (tools/curate_demo.py).
curate-demo: venv
	PATH=$(VENV)/bin:$$PATH $(PY) tools/curate_demo.py

bench: venv
	$(VENV)/bin/inrun-bench

# inrun-scores on a synthetic dump of 10^8 rows (about 10 GiB of disk under runs/).
bench-scores: venv
	PATH=$(VENV)/bin:$$PATH $(VENV)/bin/inrun-scores bench --dir runs/bench-scores

clean:
	rm -rf $(VENV) .pytest_cache
