# esr-deploy: `make demo` (compile the bundled example to a CPU engine) and `make test`.
# `install` makes .venv in the checkout and pins the CPU build of torch before anything else
# can pull the multi-GB CUDA build from PyPI.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# type stubs of the TensorRT 10.13 Python API, without tensorrt itself (needs NVIDIA's index)
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
# spandrel (architecture detection from a state dict) declares torchvision, which only two of
# its non-SR architectures use and which would pull a torch build of its own: installed
# without its dependencies; the others (einops, safetensors, ...) are in pyproject.toml
SPANDREL := spandrel==0.4.2
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-gpu gpu-check bench throughput cpu-bench precision \
	upscale-bench ray-bench zoo reparam prune lint clean cpu-bench-quick commands-bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(TRT_STUBS)
	$(BIN)/python -m pip install -q --no-deps $(SPANDREL)
	touch $@

demo: install
	$(BIN)/esr-deploy compile esr_deploy/assets/rlfn_x4.pth --target ort-fp32

test: install
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# day-to-day lane: everything but the slow end-to-end compiles and the GPU tests
test-fast: install
	$(BIN)/python -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

# on a machine with PyTorch+CUDA and no package index (bench/gpu_prepare.sh first, elsewhere):
# the AOTInductor GPU tests and bench/gpu.py with the system python3
gpu-check:
	bash bench/gpu.sh

bench: install
	$(BIN)/python bench/cpu.py
	$(BIN)/python bench/commands.py
	$(BIN)/python bench/run.py
	$(BIN)/python bench/precision.py
	$(BIN)/python bench/upscale.py
	$(BIN)/python bench/scale_out.py
	$(BIN)/python bench/throughput.py

throughput: install
	$(BIN)/python bench/throughput.py

# wall time of --help, targets, inspect and two full RLFN compiles, each in a fresh process
commands-bench: install
	$(BIN)/python bench/commands.py

upscale-bench: install
	$(BIN)/python bench/upscale.py

ray-bench: install
	$(BIN)/python bench/scale_out.py

# peers vs every CPU target, auto's choice and the matmul roofline (RLFN, IMDN, FMEN at
# 256x256 and 720x1280; results in bench/out/cpu.md): hours on 2 busy cores
cpu-bench: install
	$(BIN)/python bench/cpu.py

# the same for RLFN at 256x256, fp32/bf16 targets only: a few minutes
cpu-bench-quick: install
	$(BIN)/python bench/cpu.py --models rlfn_x4 --shapes 256x256 --targets ov-fp32 ov-bf16 \
		--peers eager-fp32 ov-plain-fp32 ort-plain-fp32 --runs 3

precision: install
	$(BIN)/python bench/precision.py

zoo: install
	$(BIN)/python bench/zoo.py

reparam: install
	$(BIN)/python bench/reparam.py

prune: install
	$(BIN)/python bench/prune.py

lint: install
	$(BIN)/ruff check esr_deploy tests bench
	$(BIN)/mypy esr_deploy

clean:
	rm -rf $(VENV) engines/*/ .pytest_cache .mypy_cache .ruff_cache
