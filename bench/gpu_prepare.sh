#!/usr/bin/env bash
# Run HERE (a machine with pip and ../shared), before the GPU call: gathers what bench/gpu.sh
# needs on the accelerator machine, which has PyTorch+CUDA, Triton, onnx, onnxruntime,
# onnxscript, numpy, pillow, typer, rich and pytest but no package index:
#   .whl/     wheels of the Python packages esr-deploy imports that are missing there
#             (torch-pruning; onnxsim is optional and left out)
#   .shared/  the RLFN and IMDN checkpoints, Set5 and Set14 (ESR_SHARED there)
# Both are git-ignored (.git/info/exclude) and must be named in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${ESR_SHARED:-../shared}"
PIP="${PIP:-python3 -m pip}"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.shared/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"; done
rm -rf .whl .shared
mkdir -p .whl .shared/weights .shared/data/sr
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "torch-pruning==1.6.1"
cp "$SHARED"/weights/rlfn_x4.pth "$SHARED"/weights/imdn_x4.pth .shared/weights/
cp -r "$SHARED"/data/sr/Set5 "$SHARED"/data/sr/Set14 .shared/data/sr/
du -sh .whl .shared
echo "now, on the accelerator machine: bash bench/gpu.sh   (carry: .whl .shared)"
