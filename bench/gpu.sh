#!/usr/bin/env bash
# The GPU check of the aoti-cuda targets, in one call on the accelerator machine, from the
# repository root (prepare here first: bash bench/gpu_prepare.sh; carry .whl and .shared):
#   1. what is installed there (GPU, driver, torch, CUDA, triton, the modules esr-deploy needs)
#   2. the gpu-marked tests of the AOTInductor backend (tests/backends/test_aoti.py)
#   3. bench/gpu.py: RLFN and IMDN aoti-cuda-fp16 compiled and validated on Set5 and Set14
#      (parity, PSNR-Y drop), latency with CUDA events at 256x256 and 720x1280 beside eager
#      fp32, eager fp16 and torch.compile
# Logs and gpu.json go to $OUT (the device tool's folder) or bench/out.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/out}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 ESR_SHARED="${ESR_SHARED:-$PWD/.shared}"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/esr-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/esr-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
$PY - <<'PYEOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "onnx", "onnxruntime", "onnxscript", "onnxsim", "torch_pruning", "numpy",
             "PIL", "typer", "rich", "pytest", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError as exc:
        print(f"  {name} MISSING ({exc})")
PYEOF

$PY -m pytest -q -m gpu tests/backends/test_aoti.py -p no:cacheprovider -rs 2>&1 | tee "$DEST/gpu-tests.log"
tests=${PIPESTATUS[0]}
$PY bench/gpu.py --out "$DEST" "$@" 2>&1 | tee "$DEST/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; bench: exit $bench"
exit $((tests != 0 || bench != 0))
